"""The scale study's cost model (benchmarks/_scale_model.py) on known inputs: pure Python, no ranks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _scale_model as sm  # noqa: E402

MLP = sm.mlp_shapes([1024, 2048, 1024, 2048])  # scale_bytes.py's 6.3M-parameter MLP
SQUARES = [(4096, 4096)] * 6  # 2-D tensors only: nothing stays dense
FAST = sm.Link(alpha=5e-6, bandwidth=100e9)


def cluster(gbit: float, per_node: int = 8) -> sm.Cluster:
    return sm.Cluster(FAST, sm.Link(alpha=20e-6, bandwidth=gbit * sm.GBIT), per_node)


def sent(cfg: str, n: int, shapes=MLP) -> float:
    return sum(sm.sent_bytes(op) for op in sm.step_ops(sm.scheme_from_config(cfg, n), shapes, n))


@pytest.mark.parametrize("n", [2, 3, 4, 8, 64, 1024])
def test_ring_allreduce_sends_2_n_minus_1_over_n(n):
    size = 4 * 10_000_000
    assert sm.sent_bytes(sm.Op("allreduce", n, size)) == pytest.approx(2 * (n - 1) / n * size)
    assert sm.sent_bytes(sm.Op("all_gather", n, size)) == pytest.approx((n - 1) * size)
    assert sm.sent_bytes(sm.Op("all_to_all", n, size)) == pytest.approx((n - 1) / n * size)
    assert sm.sent_bytes(sm.Op("reduce_scatter", n, size)) == pytest.approx((n - 1) / n * size)
    # one dense tensor of 10M elements: DDP's buckets, one allreduce each, 2(N-1)/N of the fp32 bytes in all
    assert sent("dense", n, [(10_000_000,)]) == pytest.approx(2 * (n - 1) / n * size)


def test_ring_time_on_one_node():
    n, size = 8, 4e8
    op = sm.Op("allreduce", n, size)
    assert sm.op_time(op, n, cluster(10)) == pytest.approx(2 * (n - 1) * (FAST.alpha + size / n / FAST.bandwidth))
    # across nodes the ring crosses each node's link once: the slow link sets every step
    slow = cluster(10).inter
    assert sm.op_time(sm.Op("allreduce", 64, size), 64, cluster(10)) == pytest.approx(
        2 * 63 * (slow.alpha + size / 64 / slow.bandwidth)
    )


@pytest.mark.parametrize(
    "cfg, mb",
    [
        ("dense", (25.19, 37.78, 44.08)),
        ("compressor=sign,feedback=ef", (0.83, 1.28, 1.56)),
        ("compressor=topk,density=0.01,feedback=ef", (0.52, 0.82, 1.02)),
        ("compressor=sign,feedback=doublesqueeze", (0.91, 1.39, 1.69)),  # 256 elements per scale
        ("compressor=randk,density=0.01,feedback=diana", (0.27, 0.41, 0.48)),
        ("compressor=topk,density=0.01,feedback=ef21", (0.52, 1.57, 3.67)),
    ],
)
def test_model_reproduces_the_measured_bytes_of_scale_bytes(cfg, mb):
    """benchmarks/results/scale_bytes.md: bytes per rank per step counted from the collectives."""
    for n, expected in zip((2, 4, 8), mb):
        assert sent(cfg, n) / 1e6 == pytest.approx(expected, abs=0.006)


def test_two_pass_sends_less_than_allgather_from_4_ranks():
    for comp in ("compressor=sign,feedback=ef", "compressor=topk,density=0.01,feedback=ef"):
        two = [sent(comp + ",transport=two_pass", n, SQUARES) for n in (2, 4, 8, 64, 1024)]
        gather = [sent(comp + ",transport=allgather", n, SQUARES) for n in (2, 4, 8, 64, 1024)]
        assert two[0] == pytest.approx(gather[0], rel=0.05)  # 2 ranks: about one payload either way
        assert all(t < g for t, g in zip(two[1:], gather[1:]))
        assert two[-1] < 2.1 * two[0] and gather[-1] > 1000 * gather[0]  # flat against N - 1


def test_hierarchical_cross_node_bytes_about_one_over_L():
    base = "compressor=topk,density=0.01,feedback=ef"
    for per_node in (4, 8):
        c = cluster(10, per_node)
        for n in (64, 256, 1024):
            nodes = n // per_node
            for transport in ("allgather", "two_pass"):
                flat = sm.exchange(sm.scheme_from_config(f"{base},transport={transport}", n), SQUARES, n, c, None)
                hier = sm.exchange(
                    sm.scheme_from_config(f"{base},transport={transport},hierarchical=true,ranks_per_node={per_node}", n),
                    SQUARES, n, c, None,
                )  # fmt: skip
                ratio = hier["nic_bytes"] / flat["nic_bytes"]
                if transport == "allgather":  # a ring of N - 1 payloads against one of nodes - 1 payloads
                    assert ratio == pytest.approx((nodes - 1) / (n - 1), rel=0.02)
                else:  # flat: L ranks per node send their all_to_all rows off the node
                    assert ratio == pytest.approx(2 / (per_node + 1), rel=0.05)
                assert ratio < 1.5 / per_node + 0.1
    # dense hierarchical ring: about the same bytes over the node's link, far fewer messages
    c = cluster(10)
    flat = sm.exchange(sm.Scheme(), SQUARES, 1024, c, None)
    hier = sm.exchange(sm.Scheme(hierarchical=True), SQUARES, 1024, c, None)
    assert hier["nic_bytes"] == pytest.approx(flat["nic_bytes"], rel=0.01)
    assert hier["messages"] < flat["messages"] / 4


def test_one_node_hierarchical_is_flat():
    c = cluster(10, 8)
    cfg = "compressor=sign,feedback=ef,transport=two_pass"
    for n in (2, 4, 8):
        flat = sm.exchange(sm.scheme_from_config(cfg, n), MLP, n, c, None)
        hier = sm.exchange(sm.scheme_from_config(cfg + ",hierarchical=true,ranks_per_node=8", n), MLP, n, c, None)
        assert hier == flat


def test_powersgd_two_allreduces_of_p_and_q():
    n_ranks, r = 16, 4
    scheme = sm.scheme_from_config(f"compressor=powersgd,powersgd_rank={r},feedback=ef", n_ranks)
    ops = sm.step_ops(scheme, [(1024, 2048), (1024,)], n_ranks)
    assert [(op.kind, op.nbytes) for op in ops] == [
        ("allreduce", 4 * (1024 * r + 1)), ("allreduce", 4 * (2048 * r + 1)), ("allreduce", 4 * 1024)
    ]  # fmt: skip
    # bytes per rank flat in N, as a ring allreduce
    per = [sent(f"compressor=powersgd,powersgd_rank={r},feedback=ef", n, SQUARES) for n in (2, 1024)]
    assert per[1] / per[0] == pytest.approx(2 * 1023 / 1024, rel=1e-3)
    # a matrix whose factors are not smaller travels as it is
    assert sm.low_rank_pays(8, 8, 4) is False and sm.low_rank_pays(1024, 2048, 4) is True


def test_compression_cost_grows_with_n_for_allgather_only():
    costs = {"sign": {"encode": 1e-9, "encode_call": 0.0, "decode": 2e-10, "decode_out": 1e-10, "decode_call": 0.0}}
    gather = [sm.compression_seconds(sm.scheme_from_config("compressor=sign,feedback=ef,transport=allgather", n),
                                     SQUARES, n, costs) for n in (2, 64, 1024)]  # fmt: skip
    two = [sm.compression_seconds(sm.scheme_from_config("compressor=sign,feedback=ef,transport=two_pass", n),
                                  SQUARES, n, costs) for n in (2, 64, 1024)]  # fmt: skip
    elements = 6 * 4096 * 4096
    assert gather[2] == pytest.approx(elements * (1e-9 + 1e-10 + 1024 * 2e-10))
    assert two[2] == pytest.approx(two[1], rel=0.02) and two[2] < 2.2 * elements * 1.3e-9


def test_fit_recovers_alpha_and_bandwidth():
    alpha, bw = 3e-4, 2e9
    pts = [(m, b, m * alpha + b / bw) for m, b in ((6, 25e6), (18, 75e6), (42, 350e6))]
    fitted = sm.fit_loopback(pts)
    assert fitted[0] == pytest.approx(alpha, rel=1e-6) and fitted[1] == pytest.approx(bw, rel=1e-6)


def test_architectures():
    r50, bert = sm.resnet50_shapes(), sm.bert_base_shapes()
    assert (sum(map(sm.numel, r50)), len(r50)) == (25_557_032, 161)
    assert (sum(map(sm.numel, bert)), len(bert)) == (109_482_240, 199)
    assert sum(map(sm.numel, MLP)) == 6_296_576


def test_buckets_match_ddp():
    torch = pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not hasattr(dist, "_compute_bucket_assignment_by_size"):
        pytest.skip("no bucket assignment in this torch")
    for shapes in (sm.resnet50_shapes(), MLP):
        tensors = [torch.empty(s) for s in reversed(shapes)]
        assigned = dist._compute_bucket_assignment_by_size(tensors, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * sm.MiB])
        assigned = assigned[0] if isinstance(assigned, tuple) else assigned
        assert [len(b) for b in assigned] == [len(b) for b in sm.ddp_buckets(shapes)]


def test_matches_the_library():
    """The model's transport choice and payload sizes are the library's."""
    from lightning_compress import CompressionConfig

    for cfg in ("compressor=sign,feedback=ef", "compressor=topk,density=0.01,feedback=ef21",
                "compressor=randk,density=0.01,feedback=diana", "compressor=fp16,feedback=none",
                "compressor=sign,feedback=doublesqueeze"):  # fmt: skip
        lib = CompressionConfig.from_string(cfg)
        comp = lib.make_compressor()
        for n in (2, 3, 4, 8, 1024):
            assert sm.scheme_from_config(cfg, n).transport == lib.transport_for(n)
        for numel in (1, 1000, 1024, 4097, 2_097_152):
            assert sm.payload_nbytes(sm.scheme_from_config(cfg, 2), numel) == comp.payload_nbytes(numel)
    assert math.isclose(sm.GBIT * 8, 1e9)
    from lightning_compress.collectives import ORDERED_SUM_UP_TO

    assert sm.ORDERED_SUM_UP_TO == ORDERED_SUM_UP_TO


def test_log_latency_variant_keeps_the_bytes():
    ring, log = cluster(10), sm.Cluster(FAST, sm.Link(alpha=20e-6, bandwidth=10 * sm.GBIT), 8, latency="log")
    op = sm.Op("allreduce", 1024, 4e6)
    assert sm.latency_steps(op, "ring") == 2046 and sm.latency_steps(op, "log") == 20
    gap = sm.op_time(op, 1024, ring) - sm.op_time(op, 1024, log)
    assert gap == pytest.approx((2046 - 20) * 20e-6)
    all_to_all = sm.Op("all_to_all", 1024, 4e6)
    assert sm.latency_steps(all_to_all, "ring") == 1023 and sm.latency_steps(all_to_all, "log") == 10
