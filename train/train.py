"""Train a fashion tagger: one CPU, one GPU or many, same script.

The code is `fashion_hf.training.train` (also the `fashion-hf train` command); see its docstring for the flags.
"""

from fashion_hf.training.train import main

if __name__ == "__main__":
    main()
