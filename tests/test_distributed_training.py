"""train/train.py on two CPU processes: shards, synchronised gradients, gathered metrics, one writer, resume.

`accelerate launch --num_processes 2 --cpu` starts ONE process (accelerate's simple launcher: several CPU processes
need mpirun), so two processes on one machine are `--multi_gpu` (torchrun) with ACCELERATE_USE_CPU=true, which
makes accelerate use CPU and gloo even where a GPU is present.

The real script runs under a small recorder (RECORDER, below, written next to the run) that changes nothing it
watches: each process writes rank<N>.json with the rows it read in each epoch's training and validation, its
parameters' checksum after each epoch, the row counts before and after each `gather_for_metrics`, what `validate`
returned, and what it pushed.
"""

import json
import shutil

import pytest
from helpers import TINY_FLAGS, run_training, write_product_parquet

TRAIN_ROWS, EVAL_ROWS = 24, 300  # eval over 256 (validate's batch), so each process gets different eval rows too

RECORDER = '''
import hashlib, json, os, runpy, sys
from pathlib import Path

import accelerate
import fashion_hf.training.loop as loop
from fashion_hf.training.examples import TaggingExamples
from fashion_hf.training.feature_cache import CachedFeatures

record = {"samples": {}, "eval_samples": {}, "parameters": [], "gathered": [], "validation": [], "pushed": []}
reading = None  # ("samples" or "eval_samples", epoch) while train_epoch or validate runs


def checksum(tensors):
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def recording_getitem(getitem):
    def wrapped(self, index):
        if reading is not None:
            record[reading[0]].setdefault(str(reading[1]), []).append(int(index))
        return getitem(self, index)
    return wrapped


def recording_train_epoch(tagger, loader, optimizer, scheduler, accelerator, epoch, *rest):
    global reading
    reading = ("samples", epoch)
    try:
        return train_epoch(tagger, loader, optimizer, scheduler, accelerator, epoch, *rest)
    finally:
        reading = None
        record["parameters"].append(checksum(accelerator.unwrap_model(tagger).named_parameters()))


def recording_validate(*args):
    global reading
    reading = ("eval_samples", len(record["validation"]))
    try:
        metrics = validate(*args)
    finally:
        reading = None
    record["validation"].append(metrics)
    return metrics


def recording_gather_for_metrics(self, inputs, *args, **kwargs):
    outputs = gather_for_metrics(self, inputs, *args, **kwargs)
    record["gathered"].append([len(inputs[1]), len(outputs[1])])  # the labels: rows of this process, of all
    return outputs


def recording_push(folder, repo_id, **kwargs):
    record["pushed"].append(repo_id)
    return f"https://huggingface.co/{repo_id}/commit/test"


train_epoch, validate, gather_for_metrics = loop.train_epoch, loop.validate, accelerate.Accelerator.gather_for_metrics
loop.train_epoch, loop.validate, loop.push_to_hub = recording_train_epoch, recording_validate, recording_push
accelerate.Accelerator.gather_for_metrics = recording_gather_for_metrics
CachedFeatures.__getitem__ = recording_getitem(CachedFeatures.__getitem__)
TaggingExamples.__getitem__ = recording_getitem(TaggingExamples.__getitem__)

sys.argv = sys.argv[1:]  # train/train.py and its flags
runpy.run_path(sys.argv[0], run_name="__main__")
(Path(__file__).parent / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
'''


def two_cpu_processes(folder):
    """The launcher: two processes on this machine's CPU, train/train.py run under the recorder in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recorder.py").write_text(RECORDER)
    return ("env", "ACCELERATE_USE_CPU=true", "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(folder / "recorder.py"))  # fmt: skip


def records(folder):
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("products")
    write_product_parquet(folder, "train", TRAIN_ROWS)
    write_product_parquet(folder, "validation", EVAL_ROWS)
    return folder


def flags(catalogue, output):
    return ["--data-source", str(catalogue), *TINY_FLAGS, "--output-dir", str(output), "--keep-epoch", "last"]


@pytest.fixture(scope="module")
def two_process_run(catalogue, tmp_path_factory):
    """One epoch on cached trunk features, then one fine-tuning the whole network on images; pushed (recorded)."""
    base = tmp_path_factory.mktemp("two-processes")
    launcher = two_cpu_processes(base / "recorder")
    log = run_training([*flags(catalogue, base / "run"), "--epochs", "1", "--finetune-epochs", "1",
                        "--push-to-hub", "org/tagger"], launcher=launcher)  # fmt: skip
    return base / "run", log, records(base / "recorder")


@pytest.mark.slow
def test_two_processes_write_one_model_folder_and_push_once_from_the_main_process(two_process_run):
    """Both processes train, the main one alone writes the folder, the card and the logs, and pushes once."""
    output, log, (main, other) = two_process_run
    assert sorted(p.name for p in output.iterdir()) == ["best", "checkpoints", "logs", "model"]
    recipe = json.loads((output / "model" / "recipe.json").read_text())
    assert recipe["hardware"].startswith("2 x cpu")
    assert log.count("model folder:") == 1 and log.count("epoch 2/2:") == 1
    assert main["pushed"] == ["org/tagger"] and other["pushed"] == []
    assert "https://huggingface.co/org/tagger/commit/test" in log
    assert len(list((output / "logs").rglob("events.out.tfevents.*"))) == 2  # the run's scalars and its hparams
    assert len({p.name.split(".")[-2] for p in (output / "logs").rglob("events.out.tfevents.*")}) == 1  # one pid
    for checkpoint in (output / "checkpoints").iterdir():  # one copy of the weights; each process's random state
        assert sorted(p.name for p in checkpoint.iterdir()) == [
            "model.safetensors", "optimizer.bin", "progress.json", "random_states_0.pkl", "random_states_1.pkl",
            "scheduler.bin",
        ]  # fmt: skip
    assert "were not passed to `accelerate launch`" not in log


@pytest.mark.slow
def test_each_process_trains_on_its_own_shard_of_the_training_rows(two_process_run):
    """Every epoch each process reads half the batches: 3 batches of 8 make 2 steps, the second process's last
    batch padded with the first rows (accelerate's even batches); together they read every row."""
    _, _, (main, other) = two_process_run
    assert main["samples"].keys() == other["samples"].keys() == {"0", "1"}
    for epoch in ("0", "1"):
        mine, theirs = main["samples"][epoch], other["samples"][epoch]
        assert len(mine) == len(theirs) == 16
        assert not set(mine[:8]) & set(theirs[:8])  # the first step: two different batches
        assert set(mine) | set(theirs) == set(range(TRAIN_ROWS))


@pytest.mark.slow
def test_gradients_are_synchronised_so_both_processes_hold_the_same_weights(two_process_run):
    """After every epoch, trained on different rows, the two processes' parameters are bit-identical; and they did
    change from one epoch to the next."""
    _, _, (main, other) = two_process_run
    assert len(main["parameters"]) == 2
    assert main["parameters"] == other["parameters"]
    assert main["parameters"][0] != main["parameters"][1]


@pytest.mark.slow
def test_validation_metrics_are_gathered_over_the_whole_split(two_process_run):
    """Each process scores only its share of the 300 eval rows (one batch of 256 each), yet every figure logged
    covers the whole split: `gather_for_metrics` returns every row once (the padding dropped), and both processes
    compute the same metrics, which are the ones printed."""
    _, log, (main, other) = two_process_run
    for epoch in range(2):
        mine, theirs = main["eval_samples"][str(epoch)], other["eval_samples"][str(epoch)]
        assert mine == list(range(256))  # one batch each: the first 256 rows, the last 44 padded with the first
        assert theirs[:44] == list(range(256, EVAL_ROWS)) and set(theirs[44:]) <= set(mine)
        for record in (main, other):
            assert record["gathered"][epoch] == [256, EVAL_ROWS]  # rows scored here, rows the metrics count
    assert len(main["validation"]) == 2 and main["validation"] == other["validation"]
    printed = log.split("epoch 2/2: ")[1].splitlines()[0]
    assert f"val/mean_top1={main['validation'][1]['val/mean_top1']:.4f}" in printed


@pytest.mark.slow
def test_resume_on_two_processes_continues_from_the_last_checkpoint(two_process_run, catalogue, tmp_path):
    """A second session, two processes again, loads the checkpoint on both, trains only the epoch it was asked
    for more, keeps the processes identical, and writes the folder once."""
    first, _, _ = two_process_run
    output = tmp_path / "run"
    shutil.copytree(first, output)
    launcher = two_cpu_processes(tmp_path / "recorder")
    log = run_training([*flags(catalogue, output), "--epochs", "1", "--finetune-epochs", "2", "--resume"],
                       launcher=launcher)  # fmt: skip
    main, other = records(tmp_path / "recorder")
    assert log.count("resumed from") == 1 and "at epoch 2" in log
    assert "epoch 3/3:" in log and "epoch 1/3" not in log and "epoch 2/3" not in log
    assert main["samples"].keys() == other["samples"].keys() == {"2"}
    assert main["parameters"] == other["parameters"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    assert json.loads((output / "checkpoints" / "checkpoint_2" / "progress.json").read_text())["epoch"] == 3
    assert log.count("model folder:") == 1
    recipe = json.loads((output / "model" / "recipe.json").read_text())
    first_recipe = json.loads((first / "model" / "recipe.json").read_text())
    assert recipe["wall_time_seconds"] > first_recipe["wall_time_seconds"]
