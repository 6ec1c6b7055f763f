"""ai.llmir ops through real onnxruntime sessions under mpiexec, compared exactly with numpy.

Usage: mpiexec -n N python tests/mpi_workers/collectives_worker.py SCENARIO [ARGS...]
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import onnx
from _common import (
    DTYPES,
    Checker,
    empty_like_initializer,
    fail,
    llmir_node,
    main,
    make_model,
    output_name,
    rank_data,
    reduce_reference,
    reductions_for,
    run,
    session,
)
from onnx import TensorProto, helper

from llmir_onnx.runtime.launch import setup_communication

SHAPE = (4, 4, 8)  # every axis divides by 2 and 4
AXES = (0, 1, -1)


def _permuted_group(world: int) -> list[int]:
    """A group in an order other than the ranks', so position-in-group != rank is exercised."""
    return [1, 0] if world == 2 else [3, 1, 0, 2][:world] if world == 4 else list(reversed(range(world)))


def _whole_world_cases(
    dtype_name: str, everyone: list[np.ndarray], rank: int
) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """(node, expected output) for every op x reduction x axis on the whole world."""
    world = len(everyone)
    permuted = _permuted_group(world)
    position = permuted.index(rank)
    cases = []
    for reduction in reductions_for(dtype_name):
        want = reduce_reference(everyone, reduction)
        name = f"ar_{reduction}"
        cases.append((llmir_node("AllReduce", ["x"], [name], name, reduction=reduction), want))
        name = f"ar_{reduction}_group"
        cases.append((llmir_node("AllReduce", ["x"], [name], name, reduction=reduction, group=permuted), want))
        for axis in AXES:
            name = f"rs_{reduction}_{axis}".replace("-", "m")
            node = llmir_node("ReduceScatter", ["x"], [name], name, axis=axis, reduction=reduction, group=permuted)
            cases.append((node, np.split(want, world, axis=axis)[position]))
    if dtype_name != "bool":  # the default reduction, sum, is undefined for bool
        node = llmir_node("ReduceScatter", ["x"], ["rs_default"], "rs_default")
        cases.append((node, np.split(reduce_reference(everyone, "sum"), world, axis=0)[rank]))
    for axis in AXES:
        name = f"ag_{axis}".replace("-", "m")
        node = llmir_node("AllGather", ["x"], [name], name, axis=axis, group=permuted)
        cases.append((node, np.concatenate([everyone[r] for r in permuted], axis=axis)))
    node = llmir_node("AllGather", ["x"], ["ag_default"], "ag_default")
    cases.append((node, np.concatenate(everyone, axis=0)))
    return cases


def all_ops(args: list[str]) -> int:
    """Every op x dtype x reduction x axis on the whole world, in one graph per dtype."""
    comm = setup_communication(expected_world_size=int(args[0]))
    check = Checker(comm.rank)
    options = comm.session_options(intra_op_num_threads=1)
    for index, (dtype_name, (_, elem_type)) in enumerate(DTYPES.items()):
        everyone = [rank_data(r, SHAPE, dtype_name, 100 + index) for r in range(comm.world_size)]
        cases = _whole_world_cases(dtype_name, everyone, comm.rank)
        names = [node.output[0] for node, _ in cases]
        model = make_model(
            [node for node, _ in cases], [("x", elem_type, SHAPE)], [(n, elem_type, None) for n in names]
        )
        results = run(session(model, options), {"x": everyone[comm.rank]}, [output_name(n, dtype_name) for n in names])
        inferred = _inferred_dims(model)
        for name, (node, want) in zip(names, cases, strict=True):
            got = results[output_name(name, dtype_name)]
            check.equal(f"{dtype_name} {name}", got, want, dtype_name)
            # The schema's shape inference (llmir_onnx.ops) must agree with what the kernel produced.
            has_group = any(a.name == "group" for a in node.attribute)
            expected_dims = list(got.shape) if has_group or node.op_type == "AllReduce" else None
            if expected_dims is None:  # whole world: the size of the gathered/scattered axis is unknown
                expected_dims = [d if i != 0 else None for i, d in enumerate(got.shape)]
            if inferred[name] != expected_dims:
                raise AssertionError(f"{dtype_name} {name}: inferred shape {inferred[name]}, ran {list(got.shape)}")
            check.count += 1
    return check.count


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return dims


def _uneven_patterns(world: int) -> list[list[int]]:
    """Part lengths per group position: unequal, with a member that contributes nothing (0 is allowed),
    and all equal but given anyway (the sized form must agree with the even one)."""
    unequal = [3, 1, 2, 5][:world]
    with_zero = [2, 0, 3, 1][:world]
    return [unequal, with_zero, [2] * world]


def _uneven_part(member: int, position: int, sizes: list[int], axis: int, dtype_name: str, seed: int) -> np.ndarray:
    """Member `member`'s input: [2, 3, 4] with the gathered axis replaced by its part's length."""
    shape = [2, 3, 4]
    shape[axis] = sizes[position]
    return rank_data(member, shape, dtype_name, seed)


def uneven_gather(args: list[str]) -> int:
    """AllGather with `sizes` for every dtype, on axes 0, 1 and -1 of a rank-3 tensor, over a group in
    another order than the ranks: compared exactly with numpy's concatenation, and the schema's inferred
    output length (sum(sizes)) with what the kernel produced. Run twice per session: the second call
    takes the cached signature."""
    comm = setup_communication(expected_world_size=int(args[0]))
    world = comm.world_size
    check = Checker(comm.rank)
    options = comm.session_options(intra_op_num_threads=1)
    permuted = _permuted_group(world)
    for index, (dtype_name, (_, elem_type)) in enumerate(DTYPES.items()):
        cases = []  # (input name, node, this rank's input, expected)
        for pattern_index, sizes in enumerate(_uneven_patterns(world)):
            seed = 300 + 10 * index + pattern_index
            for axis in AXES:
                name = f"agv_{pattern_index}_{axis}".replace("-", "m")
                node = llmir_node("AllGather", [f"x_{name}"], [name], name, axis=axis, group=permuted, sizes=sizes)
                parts = {m: _uneven_part(m, permuted.index(m), sizes, axis, dtype_name, seed) for m in permuted}
                want = np.concatenate([parts[member] for member in permuted], axis=axis)
                cases.append((f"x_{name}", node, parts[comm.rank], want))
        names = [node.output[0] for _, node, _, _ in cases]
        model = make_model(
            [node for _, node, _, _ in cases],
            [(x, elem_type, list(mine.shape)) for x, _, mine, _ in cases],
            [(n, elem_type, None) for n in names],
        )
        inferred = _inferred_dims(model)
        gatherer = session(model, options)
        feeds = {x: mine for x, _, mine, _ in cases}
        for call in range(2):
            results = run(gatherer, feeds, [output_name(n, dtype_name) for n in names])
            for name, (_, _, _, want) in zip(names, cases, strict=True):
                got = results[output_name(name, dtype_name)]
                check.equal(f"{dtype_name} {name} call {call}", got, want, dtype_name)
                if inferred[name] != list(got.shape):
                    raise AssertionError(f"{dtype_name} {name}: inferred shape {inferred[name]}, ran {list(got.shape)}")
                check.count += 1
    return check.count


def error_uneven_gather(args: list[str]) -> int:
    """A sized AllGather used wrongly, by case: `count` (3 sizes for 2 ranks), `length` (rank 1's input is
    not its listed length), `disagree` (the ranks list different sizes), `negative` (a negative size)."""
    case = args[0]
    comm = setup_communication()
    sizes, length = {
        "count": ([2, 1, 1], [2, 1][comm.rank]),
        "length": ([2, 1], [2, 3][comm.rank]),
        "disagree": ([[2, 1], [1, 2]][comm.rank], 2),  # each rank's own length is right by its own list
        "negative": ([2, -1], 2),
    }[case]
    _run_single_op({"axis": 1, "group": [0, 1], "sizes": sizes}, np.ones((2, length), np.float32), op_type="AllGather")
    return 1


def _pair_of(r: int) -> list[int]:
    return [0, 1] if r < 2 else [2, 3]


def _cross_of(r: int) -> list[int]:
    return [r % 2, r % 2 + 2]


def _subgroup_expected(x: list[np.ndarray], rank: int, reduction: str) -> dict[str, np.ndarray]:
    def pair_ar(r: int) -> np.ndarray:
        return reduce_reference([x[q] for q in _pair_of(r)], reduction)

    def cross_rs(r: int) -> np.ndarray:
        cross_min = reduce_reference([x[q] for q in _cross_of(r)], "min")
        return np.split(cross_min, 2, axis=1)[_cross_of(r).index(r)]

    def cross_ar(r: int) -> np.ndarray:
        return reduce_reference([x[q] for q in _cross_of(r)], "max")

    pair = _pair_of(rank)
    return {
        "pair_ar": pair_ar(rank),
        "cross_ag": np.concatenate([pair_ar(r) for r in _cross_of(rank)], axis=-1),
        "cross_rs": cross_rs(rank),
        "pair_ag": np.concatenate([cross_rs(r) for r in pair], axis=1),
        "cross_ar": cross_ar(rank),
        "pair_rs": np.split(reduce_reference([cross_ar(r) for r in pair], reduction), 2, axis=0)[pair.index(rank)],
    }


def subgroups(args: list[str]) -> int:
    """World 4: pairs {0,1},{2,3} (tp-like) and {0,2},{1,3} (cross) in one graph per dtype, chained."""
    comm = setup_communication(expected_world_size=4)
    rank = comm.rank
    check = Checker(rank)
    pair, cross = _pair_of(rank), _cross_of(rank)
    options = comm.session_options(intra_op_num_threads=1)
    for dtype_name in ("float32", "float16", "bfloat16", "int64", "uint8", "bool"):
        elem_type = DTYPES[dtype_name][1]
        x = [rank_data(r, SHAPE, dtype_name, 7) for r in range(4)]
        reduction = "max" if dtype_name == "bool" else "sum"
        nodes = [
            # pair AllReduce -> cross AllGather(axis -1)
            llmir_node("AllReduce", ["x"], ["pair_ar"], "pair_ar", reduction=reduction, group=pair),
            llmir_node("AllGather", ["pair_ar"], ["cross_ag"], "cross_ag", axis=-1, group=cross),
            # cross ReduceScatter(axis 1) -> pair AllGather(axis 1)
            llmir_node("ReduceScatter", ["x"], ["cross_rs"], "cross_rs", axis=1, reduction="min", group=cross),
            llmir_node("AllGather", ["cross_rs"], ["pair_ag"], "pair_ag", axis=1, group=pair),
            # cross AllReduce (max) -> pair ReduceScatter(axis 0)
            llmir_node("AllReduce", ["x"], ["cross_ar"], "cross_ar", reduction="max", group=cross),
            llmir_node("ReduceScatter", ["cross_ar"], ["pair_rs"], "pair_rs", axis=0, reduction=reduction, group=pair),
        ]
        names = [node.output[0] for node in nodes]
        model = make_model(nodes, [("x", elem_type, SHAPE)], [(n, elem_type, None) for n in names])
        got = run(session(model, options), {"x": x[rank]}, [output_name(n, dtype_name) for n in names])
        want = _subgroup_expected(x, rank, reduction)
        for name in names:
            check.equal(f"{dtype_name} {name}", got[output_name(name, dtype_name)], want[name], dtype_name)
    return check.count


def _ring_tensors(r: int, shape: tuple[int, ...], step: int, dtype_name: str) -> dict[str, np.ndarray]:
    seed = 1000 + 10 * step + list(DTYPES).index(dtype_name)
    return {
        "x1": rank_data(r, shape, dtype_name, seed),
        "x2": rank_data(r, shape[::-1], dtype_name, seed + 1),
        "x3": rank_data(r, (5,), dtype_name, seed + 2),
    }


def _ring_peers(rank: int, world: int) -> tuple[int, int]:
    return (rank + 1) % world, (rank - 1) % world


def send_recv(args: list[str]) -> int:
    """Ring 0->1->...->0 for every dtype: several tensors (tags 1..3, different shapes) between the same
    pair per run, Recv with and without the `shape` attribute, shapes changing from run to run."""
    comm = setup_communication()
    world, rank = comm.world_size, comm.rank
    check = Checker(rank)
    nxt, prev = _ring_peers(rank, world)
    options = comm.session_options(intra_op_num_threads=1)
    for dtype_name, (_, elem_type) in DTYPES.items():
        tags = (1, 2, 3)
        send_nodes = [llmir_node("Send", [f"x{t}"], [f"sent{t}"], f"send{t}", peer=nxt, tag=t) for t in tags]
        send_model = make_model(
            send_nodes,
            [(f"x{t}", elem_type, ["A", "B"] if t != 3 else [5]) for t in tags],
            [(f"sent{t}", TensorProto.INT64, []) for t in tags],
        )
        recv_nodes = [
            llmir_node("Recv", ["like"], ["y1"], "recv1", peer=prev, tag=1),  # shape from the handshake only
            llmir_node("Recv", ["like"], ["y2"], "recv2", peer=prev, tag=2, shape=[-1, -1]),
            llmir_node("Recv", ["like"], ["y3"], "recv3", peer=prev, tag=3, shape=[5]),
        ]
        recv_model = make_model(
            recv_nodes,
            [],
            [("y1", elem_type, None), ("y2", elem_type, [None, None]), ("y3", elem_type, [5])],
            initializers=[empty_like_initializer("like", dtype_name)],
        )
        send_session, recv_session = session(send_model, options), session(recv_model, options)
        for step, shape in enumerate([(2, 3), (4, 1), (1, 7)]):
            mine = _ring_tensors(rank, shape, step, dtype_name)
            theirs = _ring_tensors(prev, shape, step, dtype_name)
            recv_names = [output_name(n, dtype_name) for n in ("y1", "y2", "y3")]
            # Even ranks send first, odd ranks receive first: no rank waits on a rank that waits on it.
            if rank % 2 == 0:
                sent = run(send_session, mine, ["sent1", "sent2", "sent3"])
                got = run(recv_session, {}, recv_names)
            else:
                got = run(recv_session, {}, recv_names)
                sent = run(send_session, mine, ["sent1", "sent2", "sent3"])
            for t in tags:
                check.equal(
                    f"{dtype_name} step {step} sent{t}", sent[f"sent{t}"], np.array(mine[f"x{t}"].size, dtype=np.int64)
                )
                check.equal(
                    f"{dtype_name} step {step} y{t} from {prev}",
                    got[output_name(f"y{t}", dtype_name)],
                    theirs[f"x{t}"],
                    dtype_name,
                )
    return check.count


def pipeline(args: list[str]) -> int:
    """One graph per rank, ordered by data dependencies: rank 0 sends x0 and then (its Recv's `like`
    input comes from the Send's count) receives the ring's sum; ranks r>0 receive, add x_r, send on.
    Also a 4 MiB tensor each way (large messages use MPI's rendezvous protocol)."""
    comm = setup_communication()
    world, rank = comm.world_size, comm.rank
    check = Checker(rank)
    nxt, prev = _ring_peers(rank, world)
    options = comm.session_options(intra_op_num_threads=1)
    for shape in [(3, 5), (1024, 1024)]:
        x = [rank_data(r, shape, "float32", 5) for r in range(world)]
        if rank == 0:
            nodes = [
                llmir_node("Send", ["x"], ["sent"], "send", peer=nxt, tag=9),
                helper.make_node("Cast", ["sent"], ["like"], to=TensorProto.FLOAT),
                llmir_node("Recv", ["like"], ["y"], "recv", peer=prev, tag=9, shape=list(shape)),
            ]
            outputs = [("sent", TensorProto.INT64, []), ("y", TensorProto.FLOAT, list(shape))]
            model = make_model(nodes, [("x", TensorProto.FLOAT, list(shape))], outputs)
            got = run(session(model, options), {"x": x[0]}, ["sent", "y"])
            check.equal("ring sum at rank 0", got["y"], np.sum(x, axis=0).astype(np.float32))
        else:
            nodes = [
                llmir_node("Recv", ["like"], ["y"], "recv", peer=prev, tag=9),
                helper.make_node("Add", ["y", "x"], ["z"]),
                llmir_node("Send", ["z"], ["sent"], "send", peer=nxt, tag=9),
            ]
            outputs = [("sent", TensorProto.INT64, []), ("z", TensorProto.FLOAT, None)]
            model = make_model(
                nodes,
                [("x", TensorProto.FLOAT, list(shape))],
                outputs,
                initializers=[empty_like_initializer("like", "float32")],
            )
            got = run(session(model, options), {"x": x[rank]}, ["sent", "z"])
            check.equal(f"partial sum at rank {rank}", got["z"], np.sum(x[: rank + 1], axis=0).astype(np.float32))
        check.equal("sent count", got["sent"], np.array(int(np.prod(shape)), dtype=np.int64))
    return check.count


def reuse(args: list[str]) -> int:
    """Two sessions with the same group, several runs each, interleaved with a third group: communicators
    are shared across nodes, sessions and runs and must keep giving the right answers."""
    comm = setup_communication()
    world, rank = comm.world_size, comm.rank
    check = Checker(rank)
    group = list(range(world))
    other = [0, 1]
    options = comm.session_options(intra_op_num_threads=1)
    model_a = make_model(
        [
            llmir_node("AllReduce", ["x"], ["a1"], "a1", group=group),
            llmir_node("AllReduce", ["a1"], ["a2"], "a2", reduction="max", group=group),
        ],
        [("x", TensorProto.FLOAT, ["N"])],
        [("a2", TensorProto.FLOAT, ["N"])],
    )
    model_b = make_model(
        [llmir_node("AllGather", ["x"], ["b"], "b", group=group)],
        [("x", TensorProto.INT32, ["N"])],
        [("b", TensorProto.INT32, [None])],
    )
    model_c = make_model(
        [llmir_node("AllReduce", ["x"], ["c"], "c", reduction="min", group=other)],
        [("x", TensorProto.INT64, ["N"])],
        [("c", TensorProto.INT64, ["N"])],
    )
    session_a, session_b, session_c = session(model_a, options), session(model_b, options), session(model_c, options)
    for step in range(6):
        n = 3 + 5 * step
        xf = [rank_data(r, (n,), "float32", step) for r in range(world)]
        xi = [rank_data(r, (n,), "int32", step) for r in range(world)]
        check.equal(
            f"step {step} session a", run(session_a, {"x": xf[rank]}, ["a2"])["a2"], reduce_reference(xf, "sum")
        )
        check.equal(f"step {step} session b", run(session_b, {"x": xi[rank]}, ["b"])["b"], np.concatenate(xi))
        if rank in other:
            xl = [rank_data(r, (n,), "int64", step) for r in range(world)]
            check.equal(
                f"step {step} session c", run(session_c, {"x": xl[rank]}, ["c"])["c"], reduce_reference(xl[:2], "min")
            )
    return check.count


# --------------------------------------------------------------------------- error paths


def _run_single_op(node_attrs: dict, x: np.ndarray, op_type: str = "AllReduce") -> np.ndarray:
    comm = setup_communication()
    elem_type = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.bool_): TensorProto.BOOL}[x.dtype]
    model = make_model(
        [llmir_node(op_type, ["x"], ["y"], f"my_{op_type}", **node_attrs)],
        [("x", elem_type, list(x.shape))],
        [("y", elem_type, None)],
    )
    return run(session(model, comm.session_options()), {"x": x}, ["y"])["y"]


def error_not_in_group(args: list[str]) -> int:
    """Rank 1 runs an AllReduce whose group is [0] only."""
    comm = setup_communication()
    group = [0] if comm.rank == 1 else [comm.rank]
    _run_single_op({"group": group}, np.ones(4, np.float32))
    return 1


def error_group_order(args: list[str]) -> int:
    """The same two ranks in another order: rank 0's group is [1,0], rank 1's is [0,1]."""
    comm = setup_communication()
    group = [1, 0] if comm.rank == 0 else [0, 1]
    _run_single_op({"group": group}, np.ones(4, np.float32))
    return 1


def error_group_order_cached(args: list[str]) -> int:
    """Every rank runs [0,1] and [1,0] in agreement (both communicators exist), then rank 0 runs [1,0]
    while rank 1 runs [0,1]."""
    comm = setup_communication()
    for group in ([0, 1], [1, 0]):
        _run_single_op({"group": group}, np.ones(4, np.float32))
    _run_single_op({"group": [1, 0] if comm.rank == 0 else [0, 1]}, np.ones(4, np.float32))
    return 1


def error_group_beyond_world(args: list[str]) -> int:
    _run_single_op({"group": [0, 5]}, np.ones(4, np.float32))
    return 1


def error_shape_mismatch(args: list[str]) -> int:
    comm = setup_communication()
    _run_single_op({}, np.ones(4 + comm.rank, np.float32))
    return 1


def error_shape_mismatch_after_agreement(args: list[str]) -> int:
    """Both ranks agree on [4] twice (the node caches it), then pass shapes new to the node that differ:
    a new shape is checked again."""
    comm = setup_communication()
    model = make_model(
        [llmir_node("AllReduce", ["x"], ["y"], "my_AllReduce")],
        [("x", TensorProto.FLOAT, ["N"])],
        [("y", TensorProto.FLOAT, ["N"])],
    )
    reducer = session(model, comm.session_options())
    for _ in range(2):
        run(reducer, {"x": np.ones(4, np.float32)}, ["y"])
    run(reducer, {"x": np.ones(5 + comm.rank, np.float32)}, ["y"])
    return 1


def signature_checks(args: list[str]) -> int:
    """Count the signature exchanges (llmir_signature_checks): one per node and new shape, none for a
    repeated shape; with LLMIR_CHECK_EVERY_CALL=1 one per call. The results are compared with numpy on
    every call, so a skipped check cannot hide a wrong answer."""
    import ctypes

    every_call = os.environ.get("LLMIR_CHECK_EVERY_CALL") == "1"
    comm = setup_communication()
    library = ctypes.CDLL(str(comm.library_path))  # the handle onnxruntime loaded: same counters
    library.llmir_signature_checks.restype = ctypes.c_uint64
    check = Checker(comm.rank)
    model = make_model(
        [
            llmir_node("AllReduce", ["x"], ["a"], "a"),
            llmir_node("AllGather", ["a"], ["b"], "b"),
            llmir_node("ReduceScatter", ["b"], ["c"], "c"),
        ],
        [("x", TensorProto.FLOAT, ["N"])],
        [("c", TensorProto.FLOAT, [None])],
    )
    reducer = session(model, comm.session_options(intra_op_num_threads=1))
    world = comm.world_size
    for call, n in enumerate([4, 4, 6, 4, 6, 6]):
        everyone = [rank_data(r, (n,), "float32", call) for r in range(world)]
        before = library.llmir_signature_checks()
        got = run(reducer, {"x": everyone[comm.rank]}, ["c"])["c"]
        rounds = library.llmir_signature_checks() - before
        total = reduce_reference(everyone, "sum")
        check.equal(f"call {call} shape [{n}]", got, (total * world).astype(np.float32))
        new_shape = n not in [4, 4, 6, 4, 6, 6][:call]
        expected_rounds = 3 if every_call or new_shape else 0
        if rounds != expected_rounds:
            raise AssertionError(f"call {call} shape [{n}]: {rounds} signature exchanges, expected {expected_rounds}")
        check.count += 1
    return check.count


def error_scatter_indivisible(args: list[str]) -> int:
    """ReduceScatter of a dimension of 5 over 2 ranks."""
    _run_single_op({"axis": 1}, np.ones((2, 5), np.float32), op_type="ReduceScatter")
    return 1


def error_axis_out_of_range(args: list[str]) -> int:
    _run_single_op({"axis": 2}, np.ones((2, 5), np.float32), op_type="AllGather")
    return 1


def error_bool_sum(args: list[str]) -> int:
    _run_single_op({"reduction": "sum"}, np.ones(4, np.bool_))
    return 1


def error_recv_dtype(args: list[str]) -> int:
    """Rank 0 sends float32; rank 1 expects int32."""
    comm = setup_communication()
    options = comm.session_options()
    if comm.rank == 0:
        model = make_model(
            [llmir_node("Send", ["x"], ["sent"], "my_Send", peer=1)],
            [("x", TensorProto.FLOAT, [4])],
            [("sent", TensorProto.INT64, [])],
        )
        run(session(model, options), {"x": np.ones(4, np.float32)}, ["sent"])
    else:
        model = make_model(
            [llmir_node("Recv", ["like"], ["y"], "my_Recv", peer=0)],
            [],
            [("y", TensorProto.INT32, None)],
            initializers=[empty_like_initializer("like", "int32")],
        )
        run(session(model, options), {}, ["y"])
    return 1


def error_recv_shape(args: list[str]) -> int:
    """Rank 0 sends [2, 3]; rank 1's Recv says shape [2, 4]."""
    comm = setup_communication()
    options = comm.session_options()
    if comm.rank == 0:
        model = make_model(
            [llmir_node("Send", ["x"], ["sent"], "my_Send", peer=1)],
            [("x", TensorProto.FLOAT, [2, 3])],
            [("sent", TensorProto.INT64, [])],
        )
        run(session(model, options), {"x": np.ones((2, 3), np.float32)}, ["sent"])
    else:
        model = make_model(
            [llmir_node("Recv", ["like"], ["y"], "my_Recv", peer=0, shape=[2, 4])],
            [],
            [("y", TensorProto.FLOAT, None)],
            initializers=[empty_like_initializer("like", "float32")],
        )
        run(session(model, options), {}, ["y"])
    return 1


def setup_only(args: list[str]) -> int:
    setup_communication()
    return 1


def error_expected_world(args: list[str]) -> int:
    setup_communication(expected_world_size=int(args[0]))
    return 1


def peer_never_arrives(args: list[str]) -> int:
    """The other ranks enter an AllReduce over the whole world; the last rank never does. args[0]:
    'sleep': it sleeps; 'finalize': it finalizes MPI and exits with status 0; 'exit': it exits at once
    with status 0, without finalizing. Each waiting rank prints how long its AllReduce took to fail."""
    comm = setup_communication()
    last = comm.world_size - 1
    if comm.rank == last:
        print(f"RANK {comm.rank} leaving early", flush=True)
        if args[0] == "finalize":
            comm.finalize()
            os._exit(0)
        if args[0] == "exit":
            os._exit(0)
        time.sleep(60)
        print(f"RANK {comm.rank} still alive after 60 s", flush=True)
        return 0
    start = time.monotonic()
    try:
        _run_single_op({"group": list(range(comm.world_size))}, np.ones(16, np.float32))
    except Exception as error:
        print(f"RANK {comm.rank} AllReduce ended after {time.monotonic() - start:.2f} s", flush=True)
        fail(comm.rank, error, wait_for=range(last))
    return 1


def killed_rank(args: list[str]) -> int:
    """All ranks loop over AllReduce; rank args[0] SIGKILLs itself at the third iteration."""
    comm = setup_communication()
    victim = int(args[0])
    model = make_model(
        [llmir_node("AllReduce", ["x"], ["y"], "my_AllReduce")],
        [("x", TensorProto.FLOAT, [1024])],
        [("y", TensorProto.FLOAT, [1024])],
    )
    s = session(model, comm.session_options())
    x = np.ones(1024, np.float32)
    for step in range(200):
        if step == 3 and comm.rank == victim:
            print(f"RANK {comm.rank} killing itself", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        y = run(s, {"x": x}, ["y"])["y"]
        assert np.array_equal(y, x * comm.world_size)
        time.sleep(0.05)
    print(f"RANK {comm.rank} finished all steps", flush=True)
    return 1


def compute_meter(args: list[str]) -> int:
    """The library's compute meter (every rank, no stretch) on MatMul -> AllReduce -> MatMul, two ranks:
    three runs where both ranks arrive together, then one where rank 1 sleeps args[0] seconds before it
    runs, so that rank 0 polls in the AllReduce meanwhile (MPI_Test + sched_yield: CPU time). Per run,
    rank 0 compares the meter's compute with its thread's CPU time in the run (time.thread_time, start to
    point). Prints `RANK r meter ...` lines with the figures; relations only, no timing bound."""
    comm = setup_communication()
    meter = comm.compute_meter
    assert meter is not None and not meter.stretched, "run without LLMIR_COMPUTE_STRETCH"
    late_s = float(args[0])
    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            llmir_node("AllReduce", ["h"], ["r"], "meter_AllReduce"),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        [("x", TensorProto.FLOAT, [128, 256])],
        [("y", TensorProto.FLOAT, [128, 256])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    reducer = session(model, comm.session_options(intra_op_num_threads=1))
    inputs = [rank_data(r, (128, 256), "float32", 0) / np.float32(64) for r in range(comm.world_size)]
    x = inputs[comm.rank]
    expected = sum(part @ weight for part in inputs) @ weight
    check = Checker(comm.rank)
    figures = []  # (late, compute, thread CPU) per run
    for late in (False, False, False, True):
        if late and comm.rank == 1:
            time.sleep(late_s)
        before = meter.totals()
        thread_before = time.thread_time()
        with comm.metered_run():
            got = run(reducer, {"x": x}, ["y"])["y"]
        thread_cpu = time.thread_time() - thread_before
        compute = meter.totals()["compute_s"] - before["compute_s"]
        figures.append((late, compute, thread_cpu))
        print(f"RANK {comm.rank} meter late={late} compute {compute * 1e3:.3f} ms thread CPU {thread_cpu * 1e3:.3f} ms",
              flush=True)  # fmt: skip
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-3):
            raise AssertionError(f"run late={late}: the output differs from numpy's")
        check.count += 1
    foreign = meter.totals()["foreign_kernels"]
    if foreign:
        raise AssertionError(f"{foreign} ai.llmir kernels ran on another thread than the one that called run")
    for late, compute, thread_cpu in figures:
        if not 0 < compute <= thread_cpu:
            raise AssertionError(f"run late={late}: compute {compute} s is not in (0, the thread's CPU {thread_cpu} s]")
        check.count += 1
    if comm.rank == 0:
        on_time = max(compute for late, compute, _ in figures if not late)
        _, late_compute, late_thread = figures[-1]
        waited = late_thread - late_compute  # the thread's CPU time inside the AllReduce (and the runner's)
        if not waited > on_time:
            raise AssertionError(f"the late peer's wait cost rank 0 only {waited} s of CPU time, not more than a run's "
                                 f"compute ({on_time} s): no polling, the test checks nothing")  # fmt: skip
        # counted with the wait, the late run's compute would be about on_time + waited
        if not late_compute - on_time < waited / 2:
            raise AssertionError(f"the late run's compute {late_compute} s grew by the wait: on-time runs "
                                 f"{on_time} s at most, CPU time outside the compute {waited} s")  # fmt: skip
        check.count += 2
    return check.count


SCENARIOS = {
    "all_ops": all_ops,
    "subgroups": subgroups,
    "send_recv": send_recv,
    "pipeline": pipeline,
    "reuse": reuse,
    "error_not_in_group": error_not_in_group,
    "error_group_order": error_group_order,
    "error_group_order_cached": error_group_order_cached,
    "error_group_beyond_world": error_group_beyond_world,
    "error_shape_mismatch": error_shape_mismatch,
    "error_shape_mismatch_after_agreement": error_shape_mismatch_after_agreement,
    "signature_checks": signature_checks,
    "error_bool_sum": error_bool_sum,
    "error_scatter_indivisible": error_scatter_indivisible,
    "error_axis_out_of_range": error_axis_out_of_range,
    "uneven_gather": uneven_gather,
    "error_uneven_gather": error_uneven_gather,
    "error_recv_dtype": error_recv_dtype,
    "error_recv_shape": error_recv_shape,
    "error_expected_world": error_expected_world,
    "setup_only": setup_only,
    "peer_never_arrives": peer_never_arrives,
    "killed_rank": killed_rank,
    "compute_meter": compute_meter,
}

if __name__ == "__main__":
    sys.exit(main(SCENARIOS))
