"""Rewrite a model folder's code, config and processor config with this package's, weights untouched.

    fashion-hf refresh-code models/fashion-tagger

A model folder carries copies of the package's model code for `trust_remote_code` (configuration, modeling, image
processing, pipeline, image decoding). They are written by `save_pretrained`, never edited by hand: after a change
to those files, this command loads the folder with the package's classes and saves it again, with its stored
weights (float16 stays float16), so the copies are the package's again.
"""

import argparse
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoModel

from ..image_processing_fashion_tagger import FashionTaggerImageProcessor
from ..pipeline_fashion_tagging import save_tagger

WEIGHTS_FILE = "model.safetensors"


def refresh_code(folder: str | Path) -> None:
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}; pass a model folder written by train/train.py")
    model = AutoModel.from_pretrained(folder)  # the package's classes: fashion_hf registered them at import
    processor = FashionTaggerImageProcessor.from_pretrained(folder)
    save_tagger(model, processor, folder, state_dict=load_file(folder / WEIGHTS_FILE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders to rewrite")
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            refresh_code(folder)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from None
        print(f"rewrote the code and config of {folder}")


if __name__ == "__main__":
    main()
