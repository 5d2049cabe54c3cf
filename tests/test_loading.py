"""Targets become a model and example inputs (docs/contract.md section 1), in-process.

Each test writes the smallest model file that shows one rule of the loader:
which object is picked, how NAME is resolved, where inputs come from, and
what the error says when none of that works.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError, InputError, TargetError
from gradscope.loading import (
    INFERRED_BATCH,
    load_target,
    make_inputs,
    parse_dtype,
    parse_shape,
    split_target,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"

HEADER = "import torch\nfrom torch import nn\n\n"

NET_CLASS = """
class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(x)
"""


def write(folder: Path, name: str, body: str, header: str = HEADER) -> Path:
    path = folder / name
    path.write_text(header + textwrap.dedent(body).lstrip("\n"), encoding="utf-8")
    return path


# ------------------------------------------------------------------ target strings


@pytest.mark.parametrize("target,expected", [
    ("model.py", ("model.py", None)),
    ("model.py:Net", ("model.py", "Net")),
    ("dir/sub/model.py:build", ("dir/sub/model.py", "build")),
    ("pkg.module:Net", ("pkg.module", "Net")),
    ("C:\\models\\model.py", ("C:\\models\\model.py", None)),
    ("C:\\models\\model.py:Net", ("C:\\models\\model.py", "Net")),
    ("C:/models/model.py", ("C:/models/model.py", None)),
])
def test_split_target(target: str, expected: tuple[str, str | None]) -> None:
    assert split_target(target) == expected


# ------------------------------------------------------------------ which model a file gives


def test_sample_with_build_model_and_two_example_inputs() -> None:
    loaded = load_target(str(SAMPLES / "two_input_model.py"))
    assert type(loaded.model).__name__ == "ImageVectorModel"
    assert loaded.name == "two_input_model (ImageVectorModel)"
    assert [tuple(t.shape) for t in loaded.inputs] == [(8, 3, 8, 8), (8, 12)]
    assert loaded.source == str((SAMPLES / "two_input_model.py").resolve())
    assert loaded.notes == []


def test_single_no_argument_subclass_is_picked() -> None:
    loaded = load_target(str(SAMPLES / "tuple_output_mlp.py"))
    assert type(loaded.model).__name__ == "TupleOutputMLP"
    assert loaded.name == "tuple_output_mlp (TupleOutputMLP)"
    assert len(loaded.inputs) == 1 and tuple(loaded.inputs[0].shape) == (16, 32)


def test_build_model_comes_first(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", NET_CLASS + """
class Other(nn.Module):
    def forward(self, x):
        return x

model = Other()

def build_model():
    return nn.Sequential(nn.Linear(5, 3))

def example_inputs():
    return torch.randn(2, 5)
""")
    loaded = load_target(str(path))
    assert isinstance(loaded.model, nn.Sequential)
    assert loaded.model[0].in_features == 5


def test_module_level_model_instance_comes_second(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", NET_CLASS + """
class Unused(nn.Module):
    def forward(self, x):
        return x

model = Net(width=7)

def example_inputs():
    return torch.randn(3, 7)
""")
    loaded = load_target(str(path))
    assert loaded.model is sys.modules[type(loaded.model).__module__].model
    assert loaded.name == "m (model)"
    assert loaded.model.fc.in_features == 7


def test_classes_that_need_arguments_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
class NeedsWidth(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 2)

class Easy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(x)
""")
    loaded = load_target(str(path))
    assert type(loaded.model).__name__ == "Easy"


def test_imported_classes_are_not_candidates(tmp_path: Path) -> None:
    """``from torch.nn import ReLU`` puts a no-argument nn.Module class in the file's namespace."""
    path = write(tmp_path, "m.py", """
from torch.nn import ReLU, Tanh

class Only(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(x)
""")
    assert type(load_target(str(path)).model).__name__ == "Only"


def test_several_candidates_is_an_error_listing_them(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
class Alpha(nn.Module):
    def forward(self, x):
        return x

class Beta(nn.Module):
    def forward(self, x):
        return x
""")
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    line = info.value.one_line()
    assert "Alpha" in line and "Beta" in line
    assert "\n" not in line


@pytest.mark.parametrize("body,fragments", [
    ("x = 1\n", ["no model found"]),
    ("model = 3\n", ["no model found"]),
    ("class Wide(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n",
     ["no model found", "Wide"]),
])
def test_nothing_usable_is_an_error_saying_what_was_found(tmp_path: Path, body: str,
                                                          fragments: list[str]) -> None:
    path = write(tmp_path, "m.py", body)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    for fragment in fragments:
        assert fragment in info.value.one_line()


def test_factory_errors(tmp_path: Path) -> None:
    raises = write(tmp_path, "raises.py", """
def build_model():
    raise RuntimeError("cannot build today")
""")
    with pytest.raises(TargetError, match="cannot build today"):
        load_target(str(raises))
    not_a_module = write(tmp_path, "returns.py", """
def build_model():
    return "a string"
""")
    with pytest.raises(TargetError, match=r"str, not an nn\.Module"):
        load_target(str(not_a_module))


# ------------------------------------------------------------------ file.py:NAME


@pytest.fixture
def named(tmp_path: Path) -> Path:
    return write(tmp_path, "named.py", NET_CLASS + """
class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)

instance = Net(width=9)

def make_small():
    return Net(width=5)

def make_with_args(width):
    return Net(width=width)

CONSTANT = 3

def example_inputs():
    return torch.randn(2, 4)
""")


def test_name_of_an_instance(named: Path) -> None:
    loaded = load_target(f"{named}:instance", ["2,9"])
    assert loaded.name == "instance"
    assert loaded.model.fc.in_features == 9


def test_name_of_a_class(named: Path) -> None:
    loaded = load_target(f"{named}:Net")
    assert loaded.name == "Net"
    assert type(loaded.model).__name__ == "Net"
    assert loaded.model.fc.in_features == 4
    assert tuple(loaded.inputs[0].shape) == (2, 4), "example_inputs() still applies"


def test_name_of_a_factory(named: Path) -> None:
    loaded = load_target(f"{named}:make_small", ["2,5"])
    assert loaded.name == "make_small"
    assert loaded.model.fc.in_features == 5


def test_name_overrides_the_several_candidates_rule(named: Path) -> None:
    loaded = load_target(f"{named}:Other", ["2,3"])
    assert type(loaded.model).__name__ == "Other"


@pytest.mark.parametrize("name,fragment", [
    ("missing", "missing"),
    ("CONSTANT", "int"),
    ("make_with_args", "make_with_args()"),
])
def test_bad_name_is_an_error(named: Path, name: str, fragment: str) -> None:
    with pytest.raises(TargetError) as info:
        load_target(f"{named}:{name}")
    assert fragment in info.value.one_line()


def test_missing_name_lists_the_models_found(named: Path) -> None:
    with pytest.raises(TargetError) as info:
        load_target(f"{named}:Missing")
    line = info.value.one_line()
    assert "Net" in line and "Other" in line and "instance" in line


def test_package_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"gs_test_pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "site"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    write(root / package, "models.py", NET_CLASS + """
def factory():
    return Net(width=6)

ready = Net(width=8)

def example_inputs():
    return torch.randn(2, 4)
""")
    monkeypatch.syspath_prepend(str(root))
    try:
        by_class = load_target(f"{package}.models:Net")
        assert type(by_class.model).__name__ == "Net"
        assert tuple(by_class.inputs[0].shape) == (2, 4)
        assert by_class.source == str((root / package / "models.py").resolve())
        assert load_target(f"{package}.models:factory", ["2,6"]).model.fc.in_features == 6
        assert load_target(f"{package}.models:ready", ["2,8"]).model.fc.in_features == 8
        with pytest.raises(TargetError, match="nope"):
            load_target(f"{package}.models:nope")
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            monkeypatch.delitem(sys.modules, name)


def test_unknown_package_is_a_target_error() -> None:
    with pytest.raises(TargetError, match="no_such_package_xyz"):
        load_target("no_such_package_xyz.models:Net")


# ------------------------------------------------------------------ importing the file


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no such file"):
        load_target(str(tmp_path / "absent.py"))
    (tmp_path / "folder.py").mkdir()
    with pytest.raises(TargetError, match="directory"):
        load_target(str(tmp_path / "folder.py"))


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "def build_model(:\n    pass\n")
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    assert "syntax error" in info.value.one_line()
    assert "broken.py:4" in info.value.one_line()  # HEADER is three lines


def test_import_error_names_the_module_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "needs.py", "import not_a_module_xyz\n")
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    line = info.value.one_line()
    assert "not_a_module_xyz" in line and "line 4" in line
    assert not [m for m in sys.modules if m.startswith("gradscope_target_needs_")], \
        "a failed import leaves no half-initialised module behind"


def test_sibling_imports_work_also_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    """The model's folder stays importable: build_model() may import siblings lazily."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "helpers_for_gs_test.py").write_text("WIDTH = 11\n")
    (tmp_path / "lazy_helpers_for_gs_test.py").write_text("OUT = 3\n")
    path = write(tmp_path, "m.py", """
from helpers_for_gs_test import WIDTH

def build_model():
    from lazy_helpers_for_gs_test import OUT
    return nn.Linear(WIDTH, OUT)
""")
    try:
        loaded = load_target(str(path))
        assert loaded.model.in_features == 11
        assert loaded.model.out_features == 3
        assert sys.path.count(str(tmp_path.resolve())) == 1
    finally:
        sys.modules.pop("helpers_for_gs_test", None)
        sys.modules.pop("lazy_helpers_for_gs_test", None)


def test_loading_twice_gives_fresh_models(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
def build_model():
    return nn.Linear(4, 2)
""")
    first = load_target(str(path), ["2,4"]).model
    second = load_target(str(path), ["2,4"]).model
    assert first is not second


# ------------------------------------------------------------------ inputs


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    return write(tmp_path, "emb.py", """
class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(50, 4)
        self.tags = nn.Embedding(7, 4)

    def forward(self, words, tags):
        return self.words(words) + self.tags(tags)
""")


def test_input_shapes_with_int64_ids_stay_below_the_smallest_vocabulary(embeddings: Path
                                                                        ) -> None:
    loaded = load_target(str(embeddings), ["4,64", "4,64"], ["int64"])
    assert len(loaded.inputs) == 2
    for ids in loaded.inputs:
        assert ids.dtype == torch.int64, "one --dtype applies to every input"
        assert tuple(ids.shape) == (4, 64)
        assert int(ids.min()) >= 0 and int(ids.max()) < 7
    assert len(torch.unique(torch.cat(loaded.inputs))) > 1, "ids are random, not constant"
    loaded.model(*loaded.inputs)  # every id indexes both tables


def test_one_dtype_per_input() -> None:
    model = nn.Embedding(10, 3)
    ids, weights = make_inputs(model, ["2,5", "2,5"], ["long", "float64"])
    assert ids.dtype == torch.int64 and weights.dtype == torch.float64
    assert int(ids.max()) < 10


def test_default_input_dtype_is_float32_and_seeded() -> None:
    model = nn.Linear(3, 1)
    (a,) = make_inputs(model, ["5,3"], [])
    (b,) = make_inputs(model, ["5,3"], [])
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


def test_wrong_number_of_dtypes_is_an_error(embeddings: Path) -> None:
    with pytest.raises(InputError, match="3 --dtype values for 2 inputs"):
        load_target(str(embeddings), ["4,8", "4,8"], ["int64", "int64", "int64"])


def test_input_shape_overrides_example_inputs(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
def build_model():
    return nn.Linear(4, 2)

def example_inputs():
    raise AssertionError("must not be called when --input-shape is given")
""")
    loaded = load_target(str(path), ["3x4"])
    assert tuple(loaded.inputs[0].shape) == (3, 4)
    assert loaded.notes == []


@pytest.mark.parametrize("returned,shapes", [
    ("torch.randn(2, 4)", [(2, 4)]),
    ("(torch.randn(2, 4),)", [(2, 4)]),
    ("(torch.randn(2, 4), torch.randn(2, 4))", [(2, 4), (2, 4)]),
    ("[torch.randn(2, 4), torch.randn(2, 4)]", [(2, 4), (2, 4)]),
])
def test_example_inputs_tensor_or_tuple(tmp_path: Path, returned: str,
                                        shapes: list[tuple[int, ...]]) -> None:
    path = write(tmp_path, "m.py", f"""
class Add(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y=None):
        return self.fc(x) if y is None else self.fc(x) + y

def example_inputs():
    return {returned}
""")
    loaded = load_target(str(path))
    assert isinstance(loaded.inputs, tuple)
    assert [tuple(t.shape) for t in loaded.inputs] == shapes
    assert loaded.notes == []


@pytest.mark.parametrize("returned,fragment", [
    ("None", "NoneType"),
    ("()", "tuple"),
    ("raise_it()", "example inputs failed here"),
])
def test_bad_example_inputs_are_input_errors(tmp_path: Path, returned: str,
                                             fragment: str) -> None:
    path = write(tmp_path, "m.py", f"""
def build_model():
    return nn.Linear(4, 2)

def raise_it():
    raise OSError("example inputs failed here")

def example_inputs():
    return {returned}
""")
    with pytest.raises(InputError) as info:
        load_target(str(path))
    assert fragment in info.value.one_line()


def test_dtype_without_shapes_casts_example_inputs(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
def build_model():
    return nn.Embedding(5, 2)

def example_inputs():
    return torch.randn(2, 4), torch.zeros(2, dtype=torch.int64)
""")
    loaded = load_target(str(path), None, ["float64"])
    assert loaded.inputs[0].dtype == torch.float64
    assert loaded.inputs[1].dtype == torch.int64, "integer inputs (token ids) are left alone"
    with pytest.raises(InputError, match="--dtype"):
        load_target(str(path), None, ["float64", "float64", "float64"])


@pytest.mark.parametrize("layer,shape,dtype", [
    ("nn.Linear(12, 4)", (INFERRED_BATCH, 12), torch.float32),
    ("nn.Conv2d(3, 8, 3)", (INFERRED_BATCH, 3, 32, 32), torch.float32),
    ("nn.Conv1d(5, 8, 3)", (INFERRED_BATCH, 5, 32), torch.float32),
    ("nn.LSTM(6, 8, batch_first=True)", (INFERRED_BATCH, 16, 6), torch.float32),
    ("nn.Embedding(20, 4)", (INFERRED_BATCH, 32), torch.int64),
])
def test_inputs_inferred_from_the_first_layer_come_with_a_note(
        tmp_path: Path, layer: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    path = write(tmp_path, "m.py", f"""
def build_model():
    return nn.Sequential({layer})
""")
    loaded = load_target(str(path))
    (x,) = loaded.inputs
    assert tuple(x.shape) == shape
    assert x.dtype == dtype
    if dtype == torch.int64:
        assert int(x.min()) >= 0 and int(x.max()) < 20
    assert len(loaded.notes) == 1
    note = loaded.notes[0]
    assert "--input-shape" in note
    assert str(list(shape)) in note


def test_no_way_to_get_inputs_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", """
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w
""")
    with pytest.raises(InputError) as info:
        load_target(str(path))
    line = info.value.one_line()
    assert "no example inputs" in line
    assert "--input-shape" in line and "example_inputs()" in line


@pytest.mark.parametrize("text,dims", [
    ("8,3,32,32", (8, 3, 32, 32)),
    ("8x3x32x32", (8, 3, 32, 32)),
    (" 4, 16 ", (4, 16)),
    ("7", (7,)),
])
def test_parse_shape(text: str, dims: tuple[int, ...]) -> None:
    assert parse_shape(text) == dims


@pytest.mark.parametrize("text", ["", ",", "4,x", "a,b", "4,,16", "4.5,2", "0,16", "-1,4",
                                  "4;16", "4,16,"])
def test_bad_shape_text_is_an_input_error(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_shape(text)
    assert repr(text) in info.value.one_line()


def test_bad_shape_through_load_target(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", "def build_model():\n    return nn.Linear(4, 2)\n")
    with pytest.raises(InputError, match="4,x"):
        load_target(str(path), ["4,x"])


@pytest.mark.parametrize("text,dtype", [
    ("float32", torch.float32), ("torch.float16", torch.float16), ("INT64", torch.int64),
    ("bool", torch.bool), ("bfloat16", torch.bfloat16),
])
def test_parse_dtype(text: str, dtype: torch.dtype) -> None:
    assert parse_dtype(text) is dtype


def test_unknown_dtype_lists_the_choices() -> None:
    with pytest.raises(InputError) as info:
        parse_dtype("complex999")
    assert "complex999" in info.value.one_line() and "int64" in info.value.one_line()


def test_every_loading_error_is_a_gradscope_error() -> None:
    """The CLI turns GradscopeError into exit 2; anything else would be a traceback."""
    assert issubclass(TargetError, GradscopeError) and issubclass(InputError, GradscopeError)
