"""Dim roles come from the signature's structure, not from names: torch.export's automatic symbols work.

`autodims_model` rewrites a bundled dynamo export's dims the way `torch.onnx.export(..., dynamo=True)`
writes them when the caller names none (torch 2.9+): `input_ids ['s1', 's70']`, `attention_mask
['s43', 's53']`, every past its own symbol, presents `'s70 + s98'`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.model_facts import BATCH, NEW, PAST, TOTAL, dim_roles, record_dim_hints
from llmir_onnx.plan.shapes import Sizes, bind_dims, evaluate_shapes

MODELS = Path(__file__).resolve().parents[1] / "models"
SOURCE = MODELS / "llama-gqa-torch-dynamo"


def _rename(value: onnx.ValueInfoProto, names: dict[str, str]) -> None:
    for dim in value.type.tensor_type.shape.dim:
        if dim.dim_param in names:
            dim.dim_param = names[dim.dim_param]


def autodims_model(out_dir: Path, source: Path = SOURCE) -> Path:
    """The bundled dynamo export with torch.export's automatic dim symbols, in `out_dir`."""
    proto = onnx.load(str(source / "model.onnx"), load_external_data=False)
    inner = {
        "batch_size": "s1",
        "sequence_length": "s70",
        "past_sequence_length": "s98",
        "past_sequence_length + sequence_length": "s70 + s98",
    }
    by_input = {"attention_mask": {"batch_size": "s43"}, "position_ids": {"batch_size": "s7"}}
    for index, value in enumerate(proto.graph.input):
        if value.name.startswith("past_key_values."):
            by_input[value.name] = {"batch_size": f"s{200 + index}", "past_sequence_length": f"s{300 + index}"}
    for value in proto.graph.input:
        _rename(value, by_input.get(value.name, inner))
    for value in [*proto.graph.output, *proto.graph.value_info]:
        past = "past_key_values." + value.name.removeprefix("present.")
        if value.name.startswith("present.") and past in by_input:
            own = by_input[past]
            _rename(
                value,
                {
                    "batch_size": own["batch_size"],
                    "past_sequence_length + sequence_length": f"s70 + {own['past_sequence_length']}",
                },
            )
        else:
            _rename(value, inner)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out_dir / "model.onnx"))
    shutil.copy(source / "model.onnx.data", out_dir / "model.onnx.data")
    return out_dir / "model.onnx"


def test_automatic_symbols_get_their_roles_from_the_signature(tmp_path: Path) -> None:
    model = load_model(autodims_model(tmp_path))
    roles = dim_roles(model).roles
    assert roles["s1"] == roles["s43"] == roles["s7"] == roles["s203"] == BATCH
    assert roles["s70"] == NEW
    assert roles["s53"] == TOTAL
    assert {roles[f"s{300 + i}"] for i in range(3, 3 + 4)} == {PAST}
    bound = bind_dims(model, Sizes(batch=2, seq=3, past=5))
    assert bound["s1"] == 2 and bound["s70"] == 3 and bound["s53"] == 8 and bound["s303"] == 5


def test_a_sum_in_an_output_ties_its_terms() -> None:
    """`x` has no standard role; `present.0.key [.., 's70 + s98', ..]` with s98 the past makes s70 the new tokens."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Concat", ["past_key_values.0.key", "x"], ["present.0.key"], axis=2)],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["s2", 2, "s70", 4]),
            helper.make_tensor_value_info("past_key_values.0.key", onnx.TensorProto.FLOAT, ["s2", 2, "s98", 4]),
        ],
        [helper.make_tensor_value_info("present.0.key", onnx.TensorProto.FLOAT, ["s2", 2, "s70 + s98", 4])],
    )
    from onnx_ir import serde

    model = serde.deserialize_model(helper.make_model(graph))
    roles = dim_roles(model)
    assert roles.roles["s98"] == PAST and roles.roles["s70"] == NEW
    assert "s70 + s98" in roles.sources["s70"]
    assert bind_dims(model, Sizes(batch=1, seq=3, past=5)) == {"s2": 1, "s70": 3, "s98": 5}


def test_shapes_evaluate_on_automatic_symbols(tmp_path: Path) -> None:
    model = load_model(autodims_model(tmp_path))
    shapes = evaluate_shapes(model, Sizes(batch=2, seq=3, past=5))
    assert shapes["logits"].shape == (2, 3, 512)
    assert shapes["present.0.key"].shape == (2, 4, 8, 16)


def test_unsettled_symbol_names_the_cli_option(tmp_path: Path) -> None:
    path = autodims_model(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    extra = onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["s1", "s9"])
    proto.graph.input.append(extra)
    onnx.save(proto, str(path))
    model = load_model(path)
    with pytest.raises(PlanError, match=r"'s9' of input 'extra'.*--dim s9=batch\|new\|past\|total") as caught:
        bind_dims(model, Sizes(batch=1, seq=1))
    assert "overrides" not in str(caught.value)
    record_dim_hints(model, {"s9": NEW})
    assert bind_dims(model, Sizes(batch=1, seq=4))["s9"] == 4


def test_two_roles_for_one_symbol_are_refused_naming_both(tmp_path: Path) -> None:
    path = autodims_model(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    for value in proto.graph.input:
        if value.name == "attention_mask":
            _rename(value, {"s53": "s70"})
    onnx.save(proto, str(path))
    model = load_model(path)
    with pytest.raises(PlanError, match=r"'s70' stands for two things.*--dim s70="):
        dim_roles(model)
    record_dim_hints(model, {"s70": NEW})
    assert dim_roles(model).roles["s70"] == NEW


def test_autodims_export_partitions_and_matches_original(tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan

    path = autodims_model(tmp_path / "model")
    partition_to_dir(path, tmp_path / "plan", tp=2, pp=2)
    with np.load(SOURCE / "reference.npz") as data:
        feeds = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
    _, rows = verify_plan(tmp_path / "plan", feeds, model_path=path, atol=1e-4, rtol=1e-4, timeout_s=180)
    assert rows and any(row.name.startswith("present") for row in rows)
    assert all(row.ok for row in rows), [row for row in rows if not row.ok]


def test_cli_dim_settles_an_input_of_no_standard_name_through_stages(tmp_path: Path) -> None:
    """An attention mask called `am` has no standard role: partition says which --dim settles it; given on
    the CLI, the roles travel with the model (and its stage models' memory plans) and the plan verifies."""
    from typer.testing import CliRunner

    from cli.main import app
    from llmir_onnx.runtime.verify import verify_plan

    path = autodims_model(tmp_path / "model")
    proto = onnx.load(str(path), load_external_data=False)
    for value in proto.graph.input:
        if value.name == "attention_mask":
            value.name = "am"
    for node in proto.graph.node:
        node.input[:] = ["am" if name == "attention_mask" else name for name in node.input]
    onnx.save(proto, str(path))
    args = ["partition", str(path), "--tp", "2", "--pp", "2", "--quiet", "--max-seq", "64", "-o"]
    refused = CliRunner().invoke(app, [*args, str(tmp_path / "refused")])
    assert refused.exit_code != 0
    assert "of input 'am' stands for" in refused.output and "--dim s43=batch|new|past|total" in refused.output
    assert "overrides" not in refused.output
    settled = CliRunner().invoke(app, [*args, str(tmp_path / "plan"), "--dim", "s43=batch", "--dim", "s53=total"])
    assert settled.exit_code == 0, settled.output
    with np.load(SOURCE / "reference.npz") as data:
        feeds = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
    feeds["am"] = feeds.pop("attention_mask")
    _, rows = verify_plan(tmp_path / "plan", feeds, model_path=path, atol=1e-4, rtol=1e-4, timeout_s=180)
    assert rows and all(row.ok for row in rows), [row for row in rows if not row.ok]
