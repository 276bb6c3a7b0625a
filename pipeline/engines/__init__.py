"""Model engines that run in Ray workers: the reference scorers (vLLM / transformers) that stage 1 maps over the data,
and the evaluation actors (sampling engine, reference scorer, reward model) stage 3 and the demo schedule."""
