"""mtbert: fast multitask BERT fine-tuning."""
import importlib
import sys
import types

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertModelOutput", "MultitaskBert", "Tokenizer", "encode"]

# Lazy: each name is imported on first use, so that ``import mtbert.optim`` (or ``mtbert.data``)
# does not load the encoder, its Triton kernels or the tokenizer.
_HOMES = {"BertConfig": ".config", "BertModel": ".model", "BertModelOutput": ".model", "Tokenizer": ".tokenizer",
          "encode": ".encode", "MultitaskBert": ".multitask.model"}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'mtbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOMES))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Loading the submodule mtbert.encode makes the import system set the package's attribute
        # ``encode`` to that module; the package's ``encode`` stays the function.
        if name == "encode" and isinstance(value, types.ModuleType):
            value = value.encode
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
