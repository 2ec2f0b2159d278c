"""Combine trained fashion taggers into one ensemble model folder: weights, config, processor, code, metrics, card.

The code is `fashion_hf.training.ensemble` (also the `fashion-hf ensemble` command); see its docstring for the flags.
"""

from fashion_hf.training.ensemble import main

if __name__ == "__main__":
    main()
