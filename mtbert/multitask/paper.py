"""Published reference numbers the command line and the benchmarks compare against."""
from .metrics import overall_score

# "Multitasking with BERT" (CS224N), BERT-base, best configuration, official CS224N dev sets.
PAPER_DEV = {"sst_acc": 0.516, "para_acc": 0.797, "sts_pearson": 0.710}
PAPER_DEV["overall"] = overall_score(PAPER_DEV["sst_acc"], PAPER_DEV["para_acc"], PAPER_DEV["sts_pearson"])
