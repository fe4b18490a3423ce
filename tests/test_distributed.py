"""fastfuse under torch.distributed, with gloo on CPU: fastfuse.nn.SyncBatchNorm against its definition (a batch norm
over the concatenated batch), DDP training against one process, torch.compile of a DDP model, one all_reduce per
direction, and bad input. The process groups are spawned once per world size (2 and 3); each check runs inside
them, and its result comes back as one test here. A few checks without a process group run in this process."""
import copy
import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastfuse
from fastfuse import reference
from fastfuse.nn import SyncBatchNorm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CHECKS = {}  # name -> (function(rank, world_size), the world sizes it runs at)


def check(*sizes):
    def register(fn):
        CHECKS[fn.__name__] = (fn, sizes)
        return fn
    return register


# ---- helpers, in every process -----------------------------------------------------------------------------------
def _seed_words(s):
    """The Philox (key, offset) fastfuse draws right after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64).tolist()


def _keep_mask(shape, cl, p, seed):
    """The dropout keep mask of a batch norm output of this shape and layout, drawn right after manual_seed(seed)."""
    keep = torch.empty(shape, dtype=torch.bool)
    if cl:
        keep = keep.contiguous(memory_format=torch.channels_last)
    key, off = _seed_words(seed)
    keep.as_strided((keep.numel(),), (1,)).copy_(reference.dropout_keep_mask(keep.numel(), p, key, off))
    return keep


def _slice(sizes, rank):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def _all_equal_across_ranks(t):
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t.contiguous())
    for g in got[1:]:
        assert torch.equal(g, got[0]), "ranks differ"


def _count_collectives(fn):
    """fn's result, and the number of collective ops it ran, by name, as torch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return out, {n: names.count(n) for n in set(names)
                 if n.startswith("_c10d_functional::") or n.startswith("c10d::") or n.startswith("gloo:")}


TOL = dict(rtol=1e-4, atol=1e-5)
VARIANTS = [dict(), dict(pre_act="relu"), dict(residual=True), dict(post_act="relu"),
            dict(residual=True, post_act="relu"), dict(dropout_p=0.3), dict(pre_act="relu", dropout_p=0.5)]


def _against_definition(rank, ws, sizes, tail, cl, variant):
    C = tail[0]
    g = torch.Generator().manual_seed(1234)  # the same global batch and parameters on every rank
    n = sum(sizes)
    x_full = torch.randn(n, *tail, generator=g) * 2 + 0.5
    go_full = torch.randn(n, *tail, generator=g)
    res_full = torch.randn(n, *tail, generator=g) if variant.get("residual") else None
    w0, b0 = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    rm0, rv0 = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    p = variant.get("dropout_p", 0.0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    kw = {k: v for k, v in variant.items() if k != "residual"}

    sl = _slice(sizes, rank)
    x = x_full[sl].contiguous(memory_format=fmt).requires_grad_()
    res = res_full[sl].contiguous(memory_format=fmt).requires_grad_() if res_full is not None else None
    m = SyncBatchNorm(C, momentum=0.2)
    with torch.no_grad():
        m.weight.copy_(w0), m.bias.copy_(b0), m.running_mean.copy_(rm0), m.running_var.copy_(rv0)
    torch.manual_seed(100 + rank)  # each rank its own dropout masks
    y = m(x, residual=res, **kw)
    y.backward(go_full[sl].contiguous(memory_format=fmt))

    # the definition: the batch norm of the concatenated batch, with each rank's masks in its slice
    xr = x_full.clone().requires_grad_()
    rr = res_full.clone().requires_grad_() if res_full is not None else None
    wr, br = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    rm, rv = rm0.clone(), rv0.clone()
    z = F.batch_norm(xr.relu() if kw.get("pre_act") else xr, rm, rv, wr, br, True, 0.2, m.eps)
    if rr is not None:
        z = z + rr
    if kw.get("post_act"):
        z = z.relu()
    if p:
        keep = torch.cat([_keep_mask((s, *tail), cl, p, 100 + r) for r, s in enumerate(sizes)])
        z = torch.where(keep, z / (1 - p), 0.0)
    gx, gres = torch.autograd.grad(z, (xr, rr if rr is not None else xr), go_full, retain_graph=True)
    own = torch.zeros_like(go_full)
    own[sl] = go_full[sl]
    gw, gb = torch.autograd.grad(z, (wr, br), own)  # this rank's share, as torch's SyncBatchNorm gives it

    torch.testing.assert_close(y, z[sl].detach(), **TOL)
    assert y.stride() == x.stride()
    torch.testing.assert_close(x.grad, gx[sl], **TOL)
    if res is not None:
        torch.testing.assert_close(res.grad, gres[sl], **TOL)
    torch.testing.assert_close(m.weight.grad, gw, **TOL)
    torch.testing.assert_close(m.bias.grad, gb, **TOL)
    torch.testing.assert_close(m.running_mean, rm, **TOL)
    torch.testing.assert_close(m.running_var, rv, **TOL)
    assert m.num_batches_tracked.item() == 1
    for t in (m.running_mean, m.running_var):
        _all_equal_across_ranks(t)


# ---- the checks, run inside the spawned process groups, in this order ----------------------------------------------
# The profiler's first start imports much of what torch.compile does: the checks that count collectives come last.
@check(2, 3)
def check_definition_fused_variants(rank, ws):
    """Every fused variant, NCHW and channels_last, uneven batch sizes (one rank empty at 3 ranks, where the layouts
    alternate over the variants)."""
    sizes = [5, 2] if ws == 2 else [4, 0, 3]
    for i, variant in enumerate(VARIANTS):
        for cl in (False, True) if ws == 2 else (i % 2 == 1,):
            _against_definition(rank, ws, sizes, (3, 4, 5), cl, variant)


@check(2, 3)
def check_definition_1d(rank, ws):
    """(N, C) and (N, C, L) inputs; a rank with a single sample."""
    sizes = [1, 6] if ws == 2 else [3, 1, 2]
    _against_definition(rank, ws, sizes, (6,), False, dict(residual=True, post_act="relu"))
    _against_definition(rank, ws, sizes, (4, 3), False, dict(dropout_p=0.2))


@check(2)
def check_bad_input(rank, ws):
    # a check that fails on every rank raises before any collective: no rank waits
    m = SyncBatchNorm(4)
    try:
        m(torch.randn(3, 5, 2, 2))
    except (ValueError, RuntimeError) as e:
        assert "5" in str(e) and "4" in str(e), e
    else:
        raise AssertionError("a wrong channel count did not raise")
    # fewer than 2 values per channel over all ranks (ranks with 1 and 0 samples): torch's error, on every rank
    try:
        SyncBatchNorm(3)(torch.randn(1 - rank, 3))
    except ValueError as e:
        raise AssertionError(f"raised before the all_reduce: {e}")
    except RuntimeError as e:
        assert "Expected more than 1 value per channel" in str(e), e
    else:
        raise AssertionError("1 value per channel did not raise")
    # channel counts that differ between ranks: with TORCH_DISTRIBUTED_DEBUG=DETAIL torch checks the collectives'
    # shapes, and the error names the channel count, on every rank, rather than a hang or a crash
    old = dist.get_debug_level()
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    try:
        group = dist.new_group(list(range(ws)))
    finally:
        dist.set_debug_level(old)
    try:
        fastfuse.sync_batch_norm(torch.randn(4, 3 + rank), None, None, process_group=group)
    except RuntimeError as e:
        assert f"C={3 + rank} channels" in str(e) and "mismatch" in str(e), e
    else:
        raise AssertionError("mismatched channel counts did not raise")


@check(2)
def check_seed_per_rank(rank, ws):
    """Ranks seeded alike draw the same masks; seed_per_rank makes them differ, reproducibly."""
    x = torch.ones(64, 8)
    torch.manual_seed(0)
    same = fastfuse.dropout(x, 0.5)
    _all_equal_across_ranks(same)
    assert fastfuse.seed_per_rank(0) == rank
    mine = fastfuse.dropout(x, 0.5)
    got = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(got, mine)
    assert not torch.equal(got[0], got[1])
    fastfuse.seed_per_rank(0)
    assert torch.equal(fastfuse.dropout(x, 0.5), mine)


def _train(model, batches, rank=None, ws=None):
    """3 SGD steps on `batches` (each rank its even slice when rank is given); the final parameters and buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for inputs, target in batches:
        if rank is not None:
            b = target.shape[0] // ws
            inputs = [t[rank * b:(rank + 1) * b] for t in inputs]
            target = target[rank * b:(rank + 1) * b]
        opt.zero_grad()
        F.mse_loss(model(*inputs), target).backward()
        opt.step()
    module = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].to(want[k].dtype), want[k], rtol=1e-4, atol=1e-5, msg=k)


@check(2)
def check_ddp_tabular_model(rank, ws):
    """DDP (SyncBatchNorm everywhere) against one process on the concatenated batches: a fastfuse TabularModel."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = fastfuse.models.TabularModel([(5, 3), (4, 2)], 3, 1, [8, 6])
    ref = copy.deepcopy(model)
    synced = SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(type(m) is SyncBatchNorm for m in synced.modules()) == 3
    g = torch.Generator().manual_seed(1)
    batches = [((torch.stack([torch.randint(0, 5, (8,), generator=g), torch.randint(0, 4, (8,), generator=g)], 1),
                 torch.randn(8, 3, generator=g) * 3 + 1), torch.randn(8, 1, generator=g)) for _ in range(3)]
    _same_state(_train(DDP(synced), batches, rank, ws), _train(ref, batches))


@check(2)
def check_ddp_reflect_cnn(rank, ws):
    """The same for a small reflect-padded CNN made with torch's layers and nn.SyncBatchNorm, then fastfuse.fuse()."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=False),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    ref = copy.deepcopy(model)
    synced = fastfuse.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    assert sum(type(m) is SyncBatchNorm for m in synced.modules()) == 2
    assert isinstance(synced, fastfuse.nn.FusedSequential)
    g = torch.Generator().manual_seed(2)
    batches = [((torch.randn(6, 3, 8, 8, generator=g),), torch.randn(6, 2, generator=g)) for _ in range(3)]
    _same_state(_train(DDP(synced), batches, rank, ws), _train(ref, batches))


@check(2)
def check_compile_ddp(rank, ws):
    """torch.compile (aot_eager: AOTAutograd's tracing, with the ops' fake kernels) of a DDP model with fastfuse
    modules runs, and gives eager's result."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    nn = torch.nn
    model = fastfuse.nn.FusedSequential(nn.Linear(5, 6), SyncBatchNorm(6), nn.ReLU(), nn.Linear(6, 1))
    twin = copy.deepcopy(model)
    x = torch.randn(4 + rank, 5)
    eager = DDP(twin)
    traced = []

    def backend(gm, example_inputs):  # aot_eager, noting the ops of every graph dynamo hands it
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    compiled = torch.compile(DDP(model), backend=backend)
    want = eager(x)
    want.sum().backward()
    got = compiled(x)
    got.sum().backward()
    # the module's forward, the group's name included, traces into one graph with the op in it (DDP's own
    # bookkeeping around the module breaks graphs, which is torch's)
    assert "fastfuse.sync_batch_norm" in traced, traced
    torch.testing.assert_close(got, want)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


@check(2)
def check_opcheck(rank, ws):
    """torch.library.opcheck of the op (schema, fake kernel, autograd registration, AOT dispatch), with dropout and
    a post-ReLU. Every rank runs the same calls, so the collectives pair up."""
    torch.manual_seed(0)
    x = torch.randn(3 + rank, 4, 3, 3, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    args = (x, w, b, torch.zeros(4), torch.ones(4), torch.zeros((), dtype=torch.long), None, 0.1, 1e-5, False, True,
            0.2, torch.tensor([5, 7]), dist.group.WORLD.group_name)
    torch.library.opcheck(torch.ops.fastfuse.sync_batch_norm.default, args)


@check(2)
def check_one_all_reduce_per_direction(rank, ws):
    """Forward: one all_reduce (of count, sum, sum of squares); backward: one (of the two gradient sums)."""
    m = SyncBatchNorm(4)
    x = torch.randn(3 + rank, 4, 5, 5, requires_grad=True)
    y, fwd = _count_collectives(lambda: m(x, post_act="relu", dropout_p=0.1))
    _, bwd = _count_collectives(lambda: y.sum().backward())
    for counts in (fwd, bwd):
        assert counts.get("_c10d_functional::all_reduce_") == 1, counts
        assert counts.get("_c10d_functional::wait_tensor") == 1, counts
        # torch.distributed's own op under it: one, and no collective of any other kind
        others = {k: v for k, v in counts.items() if not k.startswith("_c10d_functional::")
                  and "allreduce" not in k.replace("_", "").lower()}
        assert not others, counts
        assert sum(v for k, v in counts.items() if k.startswith("c10d::")) <= 1, counts
    # in eval mode, none
    m.eval()
    _, ev = _count_collectives(lambda: m(x))
    assert not ev, ev


@check(2)
def check_eval_and_one_rank_groups(rank, ws):
    """Eval mode needs no group and is BatchNorm2d's eval; a group of one rank is BatchNorm2d's training, bit for
    bit, with no collective."""
    groups = [dist.new_group([r]) for r in range(ws)]  # every rank makes every group
    torch.manual_seed(3)
    ref = fastfuse.nn.BatchNorm2d(4)
    m = SyncBatchNorm(4, process_group=groups[rank])
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, 3, 3) + rank
    res = torch.randn_like(x)
    torch.manual_seed(9)
    want = ref(x, residual=res, post_act="relu", dropout_p=0.2)
    torch.manual_seed(9)
    got, counts = _count_collectives(lambda: m(x, residual=res, post_act="relu", dropout_p=0.2))
    assert not counts, counts
    assert torch.equal(got, want)
    for a, b in zip(m.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    m.eval(), ref.eval()
    assert torch.equal(m(x, post_act="relu"), ref(x, post_act="relu"))


# ---- spawning -------------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, ws, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=60))  # a check that leaves a rank waiting fails
    results = {}
    try:
        for name, (fn, sizes) in CHECKS.items():
            if ws in sizes:
                try:
                    fn(rank, ws)
                    results[name] = None
                except Exception:  # noqa: BLE001  (reported as that check's failure)
                    results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_RESULTS = {}


def _results(ws, tmp_path_factory):
    if ws not in _RESULTS:
        out = tmp_path_factory.mktemp(f"dist{ws}")
        mp.start_processes(_worker, args=(ws, _free_port(), str(out)), nprocs=ws, start_method="spawn")
        _RESULTS[ws] = [json.loads((out / f"{r}.json").read_text()) for r in range(ws)]
    return _RESULTS[ws]


@pytest.mark.parametrize("ws,name", [(ws, name) for name, (_, sizes) in CHECKS.items() for ws in sizes])
def test_distributed(ws, name, tmp_path_factory):
    results = _results(ws, tmp_path_factory)
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res.get(name, "not run") is not None]
    assert not errors, "\n".join(errors)


# ---- without a process group -----------------------------------------------------------------------------------------
def test_without_process_group_is_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = fastfuse.nn.BatchNorm2d(3, momentum=None)
    m = SyncBatchNorm(3, momentum=None)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5)
    for _ in range(2):
        torch.manual_seed(1)
        want = ref(x, pre_act="relu", dropout_p=0.3)
        torch.manual_seed(1)
        assert torch.equal(m(x, pre_act="relu", dropout_p=0.3), want)
    for a, b in zip(m.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    m.eval(), ref.eval()
    assert torch.equal(m(x), ref(x))


def test_module_is_drop_in():
    ours, torchs = SyncBatchNorm(5, eps=1e-3, momentum=0.2, affine=False), torch.nn.SyncBatchNorm(5, 1e-3, 0.2, False)
    assert repr(ours) == repr(torchs)
    assert ours.state_dict().keys() == torchs.state_dict().keys()
    torchs.load_state_dict(SyncBatchNorm(5, 1e-3, 0.2, False).state_dict())
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(5))


def test_convert_sync_batchnorm_keeps_tensors_and_modes():
    nn = torch.nn
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(fastfuse.nn.BatchNorm2d(4).eval(), nn.ReLU()),
                          nn.SyncBatchNorm(2, track_running_stats=False), nn.Linear(2, 2))
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert out is model
    assert [type(m) for m in (out[0], out[1][0], out[2])] == [SyncBatchNorm] * 3
    assert not out[1][0].training and out[0].training and out[2].running_mean is None
    after = out.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm


def test_fuse_swaps_and_fuses_sync_batch_norm():
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    model = nn.Sequential(Block())
    ref = copy.deepcopy(model)
    ref[0].bn = fastfuse.nn.BatchNorm2d(3)
    ref[0].bn.load_state_dict(model[0].bn.state_dict())
    fastfuse.fuse(model)
    block = model[0]
    assert type(block.bn) is SyncBatchNorm
    assert any(n.op == "call_function" and n.target.__name__ == "bn_add_relu" for n in block.graph.nodes)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), ref(x))  # no process group: batch norm


@pytest.mark.cuda
@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_cuda_nccl_world_size_1_matches_torch_sync_batch_norm():
    """The op itself (it has no fallback) over a one-rank NCCL group, against nn.SyncBatchNorm (which at one rank
    is a batch norm): outputs, gradients and running statistics."""
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = torch.nn.SyncBatchNorm(8).cuda()
        x = torch.randn(6, 8, 7, 7, device="cuda", requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        w, b = ref.weight.detach().clone().requires_grad_(), ref.bias.detach().clone().requires_grad_()
        rm, rv, nbt = ref.running_mean.clone(), ref.running_var.clone(), ref.num_batches_tracked.clone()
        seed = torch.zeros(2, dtype=torch.int64)
        y, _, _, count = torch.ops.fastfuse.sync_batch_norm(x, w, b, rm, rv, nbt, None, 0.1, 1e-5, False, False, 0.0,
                                                            seed, dist.group.WORLD.group_name)
        z = ref(xr)
        g = torch.randn_like(z)
        y.backward(g), z.backward(g)
        torch.testing.assert_close(y, z)
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(w.grad, ref.weight.grad)
        torch.testing.assert_close(b.grad, ref.bias.grad)
        torch.testing.assert_close(rm, ref.running_mean)
        torch.testing.assert_close(rv, ref.running_var)
        assert count.item() == 6 * 7 * 7 and nbt.item() == 1
    finally:
        dist.destroy_process_group()
