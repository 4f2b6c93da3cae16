"""Image throughput of ServedVictim (Serve handle and HTTP) against the same model in-process.

Columns ``handle`` and ``http``: one victim call at a time, ``predict_proba`` on a batch
of 256 images, as a user's own loop would call it; the client splits it into
``--chunk-size`` requests that overlap. Columns ``*-batches``: the attacks' own path,
``query_memberships`` on ``--bulk-batches`` batches at once (a surrogate's distillation
pool, the points of one gradient estimate), which a ServedVictim asks as the same calls
of 256 with ``--in-flight`` outstanding (``predict_proba_batches``); in-process the
same function calls the model batch after batch. Each model is measured with 1 and 2
replicas (``--replicas``). Column ``bare-actor-batches`` is the transport's floor: the
same batches sent to the model held by as many plain Ray actors, with no Serve, ledger or
checks. In-process and served runs are interleaved round by round,
their order rotated every round (so none always follows the in-process run), and the
ratio of each round is taken against that round's in-process run; the medians of the
throughputs, and the median of the per-round ratios (target >= 0.9), are printed at the
end.

    python benchmarks/serve_overhead.py                  # light conv net and the CC victim
    python benchmarks/serve_overhead.py --models cc --rounds 5 --replicas 1
    python benchmarks/serve_overhead.py --source path/to/victim.pt"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


class LightVictim(nn.Module):
    """A small conv net on 1 x 28 x 28 images with 10 clusters: cheap enough per batch
    that serving overhead shows (the worst case for the ratio)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_clusters = 10
        self.input_shape = (1, 28, 28)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def build_model(name: str, source: str | None) -> nn.Module:
    if source:
        from clusterattack.victims.io import load_victim

        return load_victim(source).eval()
    if name == "light":
        return LightVictim().eval()
    from clusterattack.victims.registry import get_spec

    torch.manual_seed(0)
    spec = get_spec(name)
    # Untrained weights: throughput does not depend on what the weights are.
    return spec.build(spec.config((1, 28, 28), 10, preset="demo")).eval()


def images_per_s(call, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for x in batches:
        call(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - started)


class BareActor:
    """The transport floor: the model in a plain Ray actor, no Serve, no ledger, no checks."""

    def __init__(self, model: nn.Module, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model

    def predict_proba(self, images):
        with torch.inference_mode():
            return self.model.predict_proba(torch.from_numpy(images.copy())).numpy()


def bare_actor_path(model: nn.Module, replicas: int, args):
    """``query_memberships``'s batches over ``replicas`` bare actors, ``--in-flight`` outstanding."""
    import ray

    remote = ray.remote(num_cpus=args.replica_cpus)(BareActor)
    actors = [remote.remote(model, args.torch_threads) for _ in range(replicas)]

    def call(x: torch.Tensor) -> torch.Tensor:
        images = x.numpy()
        pending, out = [], []
        for i, start in enumerate(range(0, len(images), args.batch_size)):
            if len(pending) >= args.in_flight:
                out.append(ray.get(pending.pop(0)))
            chunk = images[start : start + args.batch_size]
            pending.append(actors[i % replicas].predict_proba.remote(chunk))
        out.extend(ray.get(pending))
        return torch.from_numpy(np.concatenate(out))

    return call, actors


def bench_model(name: str, replicas: int, args, port: int, ledger, admin) -> dict[str, float]:
    from clusterattack.attacks.gradients import query_memberships
    from clusterattack.serving import ServeConfig, ServedVictim, deploy_victim

    model = build_model(name, args.source)
    config = ServeConfig(
        num_replicas=replicas,
        num_cpus=args.replica_cpus,
        torch_threads=args.torch_threads,
        max_batch_size=args.batch_size,
        max_images_per_request=max(args.batch_size, args.chunk_size),
        max_request_bytes=64 * 1024 * 1024,
    )
    app = f"bench-{name}-{replicas}"
    handle = deploy_victim(model, name=app, config=config, ledger=ledger)
    api_key = admin.create_key(app, budget=10**12).api_key
    generator = torch.Generator().manual_seed(1)
    shape = tuple(model.input_shape)
    batches = [torch.rand(args.batch_size, *shape, generator=generator) for _ in range(args.batches)]
    url = f"http://127.0.0.1:{port}/{app}"
    chunked = {"chunk_size": args.chunk_size, "max_in_flight": args.in_flight}
    bulk = {"chunk_size": args.batch_size, "max_in_flight": args.in_flight}
    clients = {
        "handle": ServedVictim(handle, api_key, **chunked),
        "http": ServedVictim(url, api_key, **chunked),
        "handle-batches": ServedVictim(handle, api_key, **bulk),
        "http-batches": ServedVictim(url, api_key, **bulk),
    }
    everything = [torch.cat([batches[i % len(batches)] for i in range(args.bulk_batches)])]

    def local(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.predict_proba(x)

    def attack_path(victim):
        return lambda x: query_memberships(victim, x, args.batch_size)

    bare, actors = bare_actor_path(model, replicas, args)
    calls = {
        "in-process": (local, batches),
        "in-process-batches": (attack_path(model), everything),
        "bare-actor-batches": (bare, everything),
    }
    calls.update({label: (client.predict_proba, batches) for label, client in clients.items() if "batches" not in label})
    calls.update({label: (attack_path(client), everything) for label, client in clients.items() if "batches" in label})
    runs: dict[str, list[float]] = {label: [] for label in calls}
    for call, _ in calls.values():  # warm-up: first allocations, connections, replica start
        call(batches[0])
    labels = list(calls)
    for round_index in range(args.rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            call, inputs = calls[label]
            runs[label].append(images_per_s(call, inputs))
        print(
            f"  {name} x{replicas} round {round_index + 1}: "
            + ", ".join(f"{label} {values[-1]:,.0f}" for label, values in runs.items())
            + " images/s",
            flush=True,
        )
    for label, client in clients.items():
        per_round = args.bulk_batches if "batches" in label else args.batches
        expected = (args.rounds * per_round + 1) * args.batch_size
        assert client.image_queries == expected, (label, client.image_queries, expected)
        assert client.calls == args.rounds * per_round + 1, (label, client.calls)
        client.close()
    import ray
    from ray import serve

    serve.delete(app)  # frees its CPUs for the next configuration
    for actor in actors:
        ray.kill(actor)
    out = {label: statistics.median(values) for label, values in runs.items()}
    for label in [*clients, "bare-actor-batches"]:
        base = runs["in-process-batches" if "batches" in label else "in-process"]
        out[f"{label} ratio"] = statistics.median(a / b for a, b in zip(runs[label], base, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="light,cc", help="comma list: light or registry names")
    parser.add_argument("--source", default=None, help="victim path/URI for load_victim (replaces --models)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8, help="victim calls per measurement")
    parser.add_argument(
        "--bulk-batches", type=int, default=32, help="batches asked at once by the *-batches columns (32 x 256 = 8,192)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128, help="images per request (per-call runs)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests outstanding per client")
    parser.add_argument("--replicas", default="1,2", help="comma list of replica counts to measure")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="Ray CPUs per replica (logical)")
    # One intra-op thread on both sides by default: on a machine whose cores are shared
    # with other work, OpenMP's spinning barriers make 2-thread forwards several times
    # slower than 1-thread ones, in-process and in replicas alike, which measures the
    # neighbours rather than the serving path.
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads, both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from ray import serve

    from clusterattack.serving import LedgerAdmin, LedgerConfig, start_serve

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        start_serve("127.0.0.1", port)
        ledger = LedgerConfig(db_path=f"{tmp}/ledger.sqlite", actor_name="bench-ledger")
        admin = LedgerAdmin(ledger)
        names = ["source"] if args.source else args.models.split(",")
        print(
            f"batch {args.batch_size}, {args.batches} calls x {args.rounds} rounds, batches "
            f"{args.bulk_batches} x {args.batch_size}, chunk "
            f"{args.chunk_size}, {args.in_flight} in flight, replicas {args.replicas}, "
            f"{args.torch_threads} torch threads, {os.cpu_count()} CPUs",
            flush=True,
        )
        results = {
            f"{name} x{replicas}": bench_model(name, int(replicas), args, port, ledger, admin)
            for name in names
            for replicas in args.replicas.split(",")
        }
        serve.shutdown()
        from clusterattack.serving.ledger_actor import kill_ledger

        kill_ledger(ledger)
    ray.shutdown()
    print(
        "\nmedian images/s, and in brackets the median over rounds of served / in-process "
        "(the same round's in-process run of the same call pattern; target >= 0.9)"
    )
    labels = [
        "in-process", "handle", "http",
        "in-process-batches", "handle-batches", "http-batches", "bare-actor-batches",
    ]
    print(f"{'model x replicas':<16} " + " ".join(f"{label:>18}" for label in labels))
    for name, medians in results.items():
        cells = " ".join(
            f"{medians[label]:>18,.0f}" if label.startswith("in-process")
            else f"{medians[label]:>11,.0f} ({medians[label + ' ratio']:.2f})"
            for label in labels
        )
        print(f"{name:<16} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
