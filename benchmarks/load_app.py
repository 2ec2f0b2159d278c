"""The app under load: concurrent gradio_client users tagging real photos, then tagging while others label.

`python app.py` runs in its own process on 127.0.0.1 and a free port, with the default settings of a Space, serving
`--model` (default `models/fashion-tagger` if present, else a tiny untrained model built on the fly; the choice
is printed). The clients run in this process, one thread and one `gradio_client.Client` each (`--client rest`:
Gradio's REST API over httpx instead, the same server work for a fraction of the client's CPU); every request
uploads its photo, as a user's browser or script would. Runs, one after the other:

1. single client: `--single-requests` sequential /tag requests: the latency to compare against (median);
2. `--clients` clients call /tag as fast as they get answers, for `--duration` seconds;
3. the same while `--feedback-clients` more clients submit corrections to /feedback (each a new record).

Reported per run: requests, errors (any exception in the client), answered requests per second, latency p50, p95,
p99 and max; the server's resident memory; the CPU the server and the clients used. Before the server starts and
after it stops, the pipeline the app serves (same model, same runtime: `FASHION_RUNTIME` of `--app-env`) tags the
same photos in this process in batches of the app's largest batch (`TAG_MAX_BATCH_SIZE`, 16) for `--runtime-seconds`:
the photos/s the model itself reaches here. Targets: no error; /tag under 16 clients answers at least 0.6x those
photos/s (serving efficiency), p95 reported. `--record` appends the table to BENCHMARKS.md.

    python benchmarks/load_app.py                              # 60 s per run, 16 + 8 clients
    python benchmarks/load_app.py --duration 5 --clients 4 --feedback-clients 2 --single-requests 10   # dry run
    python benchmarks/load_app.py --client rest                # the server's own capacity on a small machine
    python benchmarks/load_app.py --client bytes               # /tag as one plain POST a photo (POST /v1/tag)
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from app_harness import (
    AppServer,
    latency_row,
    markdown_table,
    mib,
    prepare_inputs,
    record,
)
from gradio_client import Client, handle_file

EFFICIENCY_TARGET = 0.6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each concurrent run (default 60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent /tag clients (default 16)")
    parser.add_argument("--feedback-clients", type=int, default=8, help="/feedback clients in the mixed run (8)")
    parser.add_argument("--single-requests", type=int, default=40, help="sequential requests of run 1 (40)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed requests first (8)")
    parser.add_argument("--images", type=int, default=64, help="distinct photos to upload (64)")
    parser.add_argument("--model", help="model folder or Hub id to serve (default: see above)")
    parser.add_argument(
        "--app-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for app.py, e.g. TAG_CONCURRENCY=4 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=sorted(CALLERS), default="gradio_client",
        help="gradio_client (default); rest: Gradio's REST API with httpx, a lighter client to measure the server; "
        "bytes: /tag as one POST of the photo's bytes to the app's /v1/tag",
    )  # fmt: skip
    parser.add_argument("--runtime-seconds", type=float, default=20.0,
                        help="seconds of the pipeline's own batched run, before and after the server (default 20)")
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    return parser.parse_args(argv)


class GradioClientCaller:
    """One user of the API through `gradio_client` (what the issue asks for, and what the README documents)."""

    def __init__(self, url: str):
        self.client = Client(url, verbose=False)

    def tag(self, photo: str) -> dict:
        return self.client.predict(handle_file(photo), api_name="/tag")

    def feedback(self, photo: str, correction: str, tags: str) -> dict:
        return self.client.predict(handle_file(photo), correction, tags, True, api_name="/feedback")


class RestCaller:
    """The same requests over Gradio's REST API with one httpx connection: the same server work, far less client
    CPU (gradio_client runs threads per call and polls every 50 ms), for measuring the server on a small machine.

    Each client keeps one session, as a browser tab or a gradio_client does: without a `session_hash` every call
    opens a new Gradio session, which builds the config of every component on the page (~5 ms of server CPU here).
    """

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=300)
        self.session_hash = uuid.uuid4().hex[:12]

    def _file(self, photo: str) -> dict:
        with open(photo, "rb") as handle:
            response = self.http.post("gradio_api/upload", files={"files": (Path(photo).name, handle)})
        response.raise_for_status()
        return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}

    def _call(self, api: str, data: list):
        response = self.http.post(f"gradio_api/call/{api}", json={"data": data, "session_hash": self.session_hash})
        response.raise_for_status()
        stream = self.http.get(f"gradio_api/call/{api}/{response.json()['event_id']}").text
        event, payload = None, None
        for line in stream.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                payload = line[5:].strip()
        if event != "complete":
            raise RuntimeError(f"{event}: {payload}")
        return json.loads(payload)[0]

    def tag(self, photo: str) -> dict:
        return self._call("tag", [self._file(photo)])

    def feedback(self, photo: str, correction: str, tags: str) -> dict:
        return self._call("feedback", [self._file(photo), correction, tags, True])


class BytesCaller(RestCaller):
    """/tag through the app's plain HTTP route, `POST /v1/tag` with the photo's bytes as the body: one request a
    photo instead of Gradio's three. /feedback still goes through Gradio's REST API."""

    def tag(self, photo: str) -> dict:
        response = self.http.post("v1/tag", params={"name": Path(photo).name}, content=Path(photo).read_bytes())
        response.raise_for_status()
        return response.json()


CALLERS = {"gradio_client": GradioClientCaller, "rest": RestCaller, "bytes": BytesCaller}


class Recorder:
    """Latencies and errors of many client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = {}
        self.errors: dict[str, list[str]] = {}
        self.ids: list[str] = []

    def ok(self, kind: str, seconds: float, answer) -> None:
        with self.lock:
            self.seconds.setdefault(kind, []).append(seconds)
            if kind == "/feedback":
                self.ids.append(answer["id"])

    def error(self, kind: str, error: Exception) -> None:
        with self.lock:
            self.errors.setdefault(kind, []).append(f"{type(error).__name__}: {str(error)[:200]}")


def concurrent_run(caller, url, photos, tag_clients, feedback_clients, duration, correction) -> tuple[Recorder, float]:
    """Clients call as fast as they are answered until `duration` is up; returns the recorder and the wall time."""
    recorder, window = Recorder(), {}

    def open_window():  # run by the last client to connect, before any is released
        window["start"] = time.monotonic()
        window["end"] = window["start"] + duration

    ready = threading.Barrier(tag_clients + feedback_clients, action=open_window)

    def worker(kind: str, index: int) -> None:
        try:
            client = caller(url)
        except Exception as error:  # noqa: BLE001 - a client that cannot connect is an error too
            recorder.error(kind, error)
            ready.abort()
            return
        ready.wait()
        count = 0
        while time.monotonic() < window["end"]:
            photo = photos[(index * 7 + count) % len(photos)]
            count += 1
            start = time.monotonic()
            try:
                if kind == "/tag":
                    answer = client.tag(photo)
                else:  # a new record each time: the same photo with another free tag
                    answer = client.feedback(photo, correction, f"check, load {index} {count}")
            except Exception as error:  # noqa: BLE001 - counted and shown
                recorder.error(kind, error)
                continue
            recorder.ok(kind, time.monotonic() - start, answer)

    threads = [threading.Thread(target=worker, args=("/tag", i), daemon=True) for i in range(tag_clients)]
    threads += [threading.Thread(target=worker, args=("/feedback", i), daemon=True) for i in range(feedback_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return recorder, time.monotonic() - window.get("start", time.monotonic())


def runtime_photos_per_second(model: str, runtime: str, photos: list[str], batch_size: int, seconds: float) -> float:
    """The served pipeline's own throughput on these photo files, batched as the app batches at most, in this
    process: the ceiling the app's answers/s are measured against."""
    import torch
    from transformers import pipeline

    import fashion_hf
    from fashion_hf.runtime import keep_freed_memory

    keep_freed_memory()  # as app.py does
    options = {} if runtime == "torch" else {"runtime": runtime}
    tagger = pipeline(fashion_hf.TASK, model=model, device=-1, **options)
    images = [Path(photo).read_bytes() for photo in photos]  # encoded, as uploads arrive
    with torch.inference_mode():
        tagger(images[:batch_size], batch_size=batch_size)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tagger([images[(done + i) % len(images)] for i in range(batch_size)], batch_size=batch_size)
            done += batch_size
    return done / (time.perf_counter() - start)


def stored_ids(feedback_dir: Path) -> list[str]:
    """Record ids in the feedback folder's metadata files (every line must be complete JSON)."""
    ids = []
    for meta in feedback_dir.glob("data/*/metadata.jsonl"):
        ids += [json.loads(line)["id"] for line in meta.read_text(encoding="utf-8").splitlines()]
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.app_env)
    with tempfile.TemporaryDirectory(prefix="load-app-") as tmp:
        workdir = Path(tmp)
        inputs = prepare_inputs(args.model, args.images, workdir)
        feedback_dir = workdir / "feedback"
        runtime = extra_env.get("FASHION_RUNTIME", "torch")
        batch_size = int(extra_env.get("TAG_MAX_BATCH_SIZE", 16))
        ceiling = [runtime_photos_per_second(inputs.model, runtime, inputs.photos, batch_size, args.runtime_seconds)]
        print(f"the pipeline alone ({runtime}, batches of {batch_size}): {ceiling[0]:.1f} photos/s")
        with AppServer(workdir, inputs.model, feedback_dir, extra_env) as server:
            started = server.memory()
            print(f"app.py ready at {server.url} (pid {server.process.pid}, {mib(started['rss'])} resident)")
            caller = CALLERS[args.client]
            client = caller(server.url)
            for index in range(args.warmup):
                client.tag(inputs.photos[index % len(inputs.photos)])
            single, errors = [], 0
            run_start = time.monotonic()
            for index in range(args.single_requests):
                start = time.monotonic()
                try:
                    client.tag(inputs.photos[index % len(inputs.photos)])
                    single.append(time.monotonic() - start)
                except Exception:  # noqa: BLE001
                    errors += 1
            rows = [latency_row("/tag alone", "1", single, errors, time.monotonic() - run_start)]
            baseline = statistics.median(single)
            print(f"single client: median {baseline * 1000:.0f} ms over {len(single)} requests")

            runs = [("/tag", args.clients, 0), ("/tag + /feedback", args.clients, args.feedback_clients)]
            all_errors, feedback_ids, cpu_notes = {}, [], []
            for name, tag_clients, feedback_clients in runs:
                print(f"{name}: {tag_clients} + {feedback_clients} clients for {args.duration:g} s ...", flush=True)
                server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
                recorder, wall = concurrent_run(
                    caller, server.url, inputs.photos, tag_clients, feedback_clients, args.duration, inputs.correction
                )
                server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
                answered = sum(len(values) for values in recorder.seconds.values())
                cpu_notes.append(
                    f"{name}: app.py used {server_cpu / wall:.2f} cores ({1000 * server_cpu / max(answered, 1):.0f} ms "
                    f"of CPU per answered request), the clients {client_cpu / wall:.2f} cores"
                )
                mixed = feedback_clients > 0
                for kind, count in (("/tag", tag_clients), ("/feedback", feedback_clients)):
                    if count == 0:
                        continue
                    label = f"{kind}, with {'/feedback' if kind == '/tag' else '/tag'}" if mixed else kind
                    errors_here = recorder.errors.get(kind, [])
                    rows.append(latency_row(label, str(count), recorder.seconds.get(kind, []), len(errors_here), wall))
                    all_errors[label] = errors_here
                feedback_ids += recorder.ids
            ended = server.memory()
        on_disk = stored_ids(feedback_dir)
        ceiling.append(runtime_photos_per_second(inputs.model, runtime, inputs.photos, batch_size, args.runtime_seconds))
        print(f"the pipeline alone, after: {ceiling[1]:.1f} photos/s")

    print()
    table = markdown_table(rows)
    print(table)
    error_count = sum(row["errors"] for row in rows)
    runtime_rate = statistics.mean(ceiling)
    verdicts = [f"errors: {error_count} (target 0): {'PASS' if error_count == 0 else 'MISS'}"]
    verdicts.append(
        f"ceiling: the pipeline alone ({runtime}, batches of {batch_size}, in the benchmark's process, server stopped): "
        f"{ceiling[0]:.1f} photos/s before the runs, {ceiling[1]:.1f} after"
    )
    tag_alone = next(row for row in rows if row["run"] == "/tag")
    efficiency = tag_alone["per_second"] / runtime_rate
    verdicts.append(
        f"serving efficiency: /tag under {args.clients} clients answered {tag_alone['per_second']:.1f}/s = "
        f"{efficiency:.2f}x the pipeline's {runtime_rate:.1f} photos/s (target >= {EFFICIENCY_TARGET:g}x): "
        f"{'PASS' if efficiency >= EFFICIENCY_TARGET else 'MISS'}; p95 {tag_alone['p95']:.0f} ms "
        f"({tag_alone['p95'] / (baseline * 1000):.1f}x the single-client median)"
    )
    found = len(set(feedback_ids) & set(on_disk))
    kept = f"{found} of {len(feedback_ids)} acknowledged feedback records on disk after the run "
    kept += f"({len(on_disk)} records, {len(on_disk) - len(set(on_disk))} duplicate ids)"
    memory = (
        f"app.py resident memory: {mib(started['rss'])} when ready, {mib(ended['rss'])} at the end, "
        f"peak {mib(ended['peak'])}"
    )
    notes = [*verdicts, kept, memory, *cpu_notes]
    print("\n".join(notes))
    for where, messages in all_errors.items():
        if messages:
            print(f"{where}: {len(messages)} error(s), first: {messages[0]}")
    if args.record:
        command = "python benchmarks/load_app.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = "\n".join(
            [
                f"{args.clients} {args.client} clients call /tag for {args.duration:g} s, then the same while "
                f"{args.feedback_clients} more submit corrections to /feedback; every request uploads its photo. "
                "Clients and `python app.py` (default settings) share the machine.",
                "",
                f"```bash\n{command.strip()}\n```",
                "",
                f"Served: {inputs.model_text}. Photos: {inputs.photos_text}. {inputs.machine}.",
                "",
                table,
                "",
                *[f"- {line}" for line in notes],
            ]
        )
        record("App under load: benchmarks/load_app.py", body)
    return 0 if error_count == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
