"""Feedback durability at scale: 1,000 submissions from 16 gradio_client clients, then every record checked.

`python app.py` runs in its own process (as in `load_app.py`: the shipped model if present, else a tiny one built
on the fly); `--clients` threads, one `gradio_client.Client` each, submit `--submissions` distinct corrections to
/feedback (a real photo, a valid label, a free tag unique to the submission). A submission that fails is retried
until it is acknowledged: the app answers a resubmission that had in fact been stored with the same record id.
With `--kill-after N`, app.py is killed with SIGKILL once N submissions are acknowledged and started again on the
same folder while the clients keep going.

Then, with the app stopped, the folder is checked as a consumer would: exactly one record per submission, no
duplicate id, every acknowledged id present, every line complete JSON, every image readable, `FeedbackStore`
finds no corrupt line, and `datasets.load_dataset(folder)` gives the same rows. Reported: the time taken,
acknowledged submissions per second, latency percentiles, the checks. `--record` appends them to BENCHMARKS.md.

    python benchmarks/bench_feedback.py                                  # 1,000 submissions, 16 clients
    python benchmarks/bench_feedback.py --kill-after 500                 # and SIGKILL app.py half-way
    python benchmarks/bench_feedback.py --submissions 100 --clients 4    # dry run
"""

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

from app_harness import (
    REPO,
    AppServer,
    latency_row,
    markdown_table,
    prepare_inputs,
    record,
)
from gradio_client import Client, handle_file

RETRY_SECONDS = 0.5
GIVE_UP_SECONDS = 600.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=1000, help="distinct submissions (default 1000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--kill-after", type=int, default=None, metavar="N", help="SIGKILL app.py after N acks")
    parser.add_argument("--images", type=int, default=64, help="distinct photos (default 64)")
    parser.add_argument("--model", help="model folder or Hub id to serve (default: models/fashion-tagger or tiny)")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    return parser.parse_args(argv)


class Submissions:
    """The work queue, and what came back: record id per submission, latencies, failed attempts."""

    def __init__(self, count: int):
        self.todo = queue.Queue()
        for index in range(count):
            self.todo.put(index)
        self.lock = threading.Lock()
        self.ids: dict[int, str] = {}
        self.seconds: list[float] = []
        self.failed_attempts: list[str] = []
        self.acknowledged = threading.Condition(self.lock)

    def done(self, index: int, record_id: str, seconds: float) -> None:
        with self.lock:
            self.ids[index] = record_id
            self.seconds.append(seconds)
            self.acknowledged.notify_all()

    def failed(self, error: Exception) -> None:
        with self.lock:
            self.failed_attempts.append(f"{type(error).__name__}: {str(error)[:200]}")


def connect(url: str, session_hash: str | None = None) -> Client:
    """A client of the app; given the session of an earlier one, it continues that session, so that the app knows a
    resubmission after a reconnect as a retry of that submitter's and gives back its id instead of a new record."""
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while True:
        try:
            client = Client(url, verbose=False)
            if session_hash:
                client.session_hash = session_hash
            return client
        except Exception:  # noqa: BLE001 - the server is restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_SECONDS)


def worker(url: str, photos: list[str], correction: str, work: Submissions) -> None:
    client = connect(url)
    while True:
        try:
            index = work.todo.get_nowait()
        except queue.Empty:
            return
        photo, tags = photos[index % len(photos)], f"check, sample {index}"
        deadline = time.monotonic() + GIVE_UP_SECONDS
        while True:  # until acknowledged: a resubmission of a stored one gets its id back
            start = time.monotonic()
            try:
                job = client.submit(handle_file(photo), correction, tags, True, api_name="/feedback")
                answer = job.result(timeout=120)
                work.done(index, answer["id"], time.monotonic() - start)
                break
            except Exception as error:  # noqa: BLE001 - counted; the submission is tried again
                work.failed(error)
                if time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_SECONDS)
                client = connect(url, client.session_hash)


def check_folder(folder: Path, acknowledged: dict[int, str], cache_dir: Path) -> tuple[list[tuple[str, bool]], float]:
    """(check, passed) pairs of the folder against what was acknowledged, and the seconds load_dataset took."""
    import datasets
    from PIL import Image

    from fashion_hf.feedback import FeedbackStore

    expected = set(acknowledged.values())
    lines, torn = [], 0
    for meta in sorted(folder.glob("data/*/metadata.jsonl")):
        raw = meta.read_bytes()
        torn += 0 if raw.endswith(b"\n") else 1
        for line in raw.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                torn += 1
    ids = [line["id"] for line in lines]
    unreadable = 0
    for line in lines:
        try:
            with Image.open(next(folder.glob(f"data/*/{line['file_name']}"))) as image:
                image.load()
        except (OSError, StopIteration):
            unreadable += 1
    store = FeedbackStore(folder)
    start = time.perf_counter()
    dataset = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache_dir))
    load_seconds = time.perf_counter() - start
    store_ok = len(store) == len(lines) and not store.corrupt_lines
    dataset_ok = dataset.num_rows == len(lines) and set(dataset["id"]) == set(ids)
    checks = [
        (f"{len(acknowledged)} acknowledged, {len(expected)} distinct ids", len(expected) == len(acknowledged)),
        (f"{len(lines)} records on disk, exactly one per submission", len(lines) == len(acknowledged)),
        (f"{len(ids) - len(set(ids))} duplicate record ids", len(ids) == len(set(ids))),
        (f"{len(expected - set(ids))} acknowledged ids missing", expected <= set(ids)),
        (f"{torn} torn or unparsable lines", torn == 0),
        (f"{unreadable} unreadable images", unreadable == 0),
        (f"FeedbackStore reads {len(store)} records, {store.corrupt_lines} corrupt lines", store_ok),
        (f"load_dataset: {dataset.num_rows} rows with the same ids in {load_seconds:.1f} s", dataset_ok),
    ]  # fmt: skip
    return checks, load_seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        workdir = Path(tmp)
        inputs = prepare_inputs(args.model, args.images, workdir)
        folder = workdir / "feedback"
        server = AppServer(workdir, inputs.model, folder).start()
        work = Submissions(args.submissions)
        kills = []
        try:
            threads = [
                threading.Thread(target=worker, args=(server.url, inputs.photos, inputs.correction, work), daemon=True)
                for _ in range(args.clients)
            ]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            if args.kill_after is not None:
                with work.acknowledged:
                    work.acknowledged.wait_for(lambda: len(work.ids) >= args.kill_after, timeout=GIVE_UP_SECONDS)
                server.kill()
                kills.append(len(work.ids))
                print(f"SIGKILL after {kills[0]} acknowledgements; restarting app.py on the same folder", flush=True)
                restart = time.monotonic()
                server.start()
                print(f"app.py back after {time.monotonic() - restart:.1f} s", flush=True)
            for thread in threads:
                thread.join()
            wall = time.monotonic() - start
        finally:
            server.stop()
        checks, _ = check_folder(folder, work.ids, workdir / "cache")

    row = latency_row("/feedback", str(args.clients), work.seconds, len(work.failed_attempts), wall)
    row["run"] = f"{args.submissions} submissions" + (f", SIGKILL after {kills[0]}" if kills else "")
    table = markdown_table([row])
    passed = all(ok for _, ok in checks)
    lines = [
        f"{args.submissions} submissions in {wall:.1f} s: {len(work.ids) / wall:.1f} acknowledged per second; "
        f"{len(work.failed_attempts)} failed attempts retried (the errors column)",
        *[f"{'PASS' if ok else 'MISS'}: {text}" for text, ok in checks],
    ]
    print()
    print(table)
    print("\n".join(lines))
    if work.failed_attempts:
        print(f"first failed attempt: {work.failed_attempts[0]}")
    if args.record:
        command = "python benchmarks/bench_feedback.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = "\n".join(
            [
                f"{args.clients} gradio_client clients submit {args.submissions} distinct corrections to /feedback "
                "(a failed attempt is retried until acknowledged); then, with the app stopped, the folder is checked.",
                "",
                f"```bash\n{command.strip()}\n```",
                "",
                f"Served: {inputs.model_text}. Photos: {inputs.photos_text}. {inputs.machine}; "
                "clients and server share the machine.",
                "",
                table,
                "",
                *[f"- {line}" for line in lines],
            ]
        )
        record("Feedback durability: benchmarks/bench_feedback.py", body)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
