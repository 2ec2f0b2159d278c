"""Evaluate a saved fashion tagger on a labelled dataset: per-attribute scores, tag-set scores and plots.

The code is `fashion_hf.training.evaluate` (also the `fashion-hf evaluate` command); see its docstring for the flags.
"""

from fashion_hf.training.evaluate import main

if __name__ == "__main__":
    main()
