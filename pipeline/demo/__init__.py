"""The DPO paper's sentiment experiment (`dpo-pipeline demo`) and the tiny model/tokenizer builder: a user of the
library and the stages, never imported by them."""
