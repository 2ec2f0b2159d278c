"""The `fashion-hf` command: one entry point for the project's command-line tools.

    fashion-hf train --config train/configs/fashion-product-images.yaml   # one process; `accelerate launch` for more
    fashion-hf evaluate models/fashion-tagger --split validation
    fashion-hf ensemble MEMBER [MEMBER ...] --output-dir DIR
    fashion-hf model-card MODEL_FOLDER --metrics metrics.json --recipe recipe.json
    fashion-hf refresh-code MODEL_FOLDER       # its code copies rewritten by save_pretrained, weights untouched
    fashion-hf calibrate MODEL_FOLDER --output DIR --in-place   # calibrated scores, "not sure", off-distribution
    fashion-hf tag IMAGES --output DIR            # tag a folder, table or dataset into parquet/JSONL/CSV shards
    fashion-hf export-onnx MODEL_FOLDER [--quantize]   # ONNX graphs of its encoders, for runtime="onnx"
    fashion-hf index CATALOGUE --output INDEX     # a faiss index of its image embeddings, for similar items

Each subcommand's `--help` lists its flags.
"""

import importlib
import sys

# Imported only when chosen: `fashion-hf evaluate` should not pay for Accelerate, nor `fashion-hf train` for plots.
COMMANDS = {
    "train": "fashion_hf.training.train",
    "evaluate": "fashion_hf.training.evaluate",
    "ensemble": "fashion_hf.training.ensemble",
    "model-card": "fashion_hf.training.model_card",
    "refresh-code": "fashion_hf.training.refresh_code",
    "calibrate": "fashion_hf.training.calibrate",
    "tag": "fashion_hf.tag",
    "export-onnx": "fashion_hf.training.export_onnx",
    "index": "fashion_hf.similar",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, *rest = argv
    if command not in COMMANDS:
        sys.exit(f"fashion-hf: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    main()
