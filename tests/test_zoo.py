"""A fast subset of the zoo (``benchmarks/zoo/``, the whole of it: ``benchmarks/zoo.py``):
real architectures with their expected verdicts, and verdicts that do not depend on the seed.

Each zoo file builds a model from its default initialisation and says what a correct
tool concludes (``EXPECT``, ``EXPECT_RULES``, ``REASON``). Here a few of them are
analysed in-process, as ``gradscope analyze`` would, and scored the way the benchmark
scores them; six of them again over five initialisation and probe seeds (the whole
zoo: ``benchmarks/zoo.py --seeds 5``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import gradscope
from gradscope.loading import load_target

ZOO = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo"
sys.path.insert(0, str(ZOO.parent))
zoo = pytest.importorskip("zoo")  # benchmarks/zoo.py: the scoring is the benchmark's own

#: Quick ones (a few seconds each) covering CNN, BatchNorm, zero-init head, RNN, decoder,
#: encoder-decoder with a masked NaN, equal deep-copied layers with mean pooling, an
#: encoder read only through cross-attention, and known-bad variants.
SUBSET = ("classic/resnet18", "classic/resnet50", "classic/mobilenetv2", "classic/vgg11",
          "classic/vit", "classic/densenet121",
          "classic/rezero_mlp", "hf_decoders/llama", "hf_encoders/t5_conditional",
          "bad/sigmoid_mlp20", "bad/dead_relu_negbias", "bad/lstm200_forget0",
          "classic/transformer_meanpool", "hf_encoders/whisper_conditional")


def _doc(name: str, seed: int = 0, init_seed: int | None = None) -> dict[str, Any]:
    path = ZOO / f"{name}.py"
    if init_seed is None:
        loaded = load_target(str(path))
        report = gradscope.analyze(loaded.model, loaded.inputs, device="cpu", seed=seed,
                                   loss=loaded.loss_fn or "dot")
        return report.to_dict()
    module = _import(path)
    module.SEED = init_seed  # the files seed their build with this constant
    inputs = module.example_inputs()
    report = gradscope.analyze(module.build_model(), inputs, device="cpu", seed=seed)
    return report.to_dict()


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"zoo_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SUBSET)
def test_zoo_subset_gets_its_expected_verdict(name: str) -> None:
    expect = zoo.constants(ZOO / f"{name}.py")
    doc = _doc(name)
    assert zoo.score(expect, doc) == "ok", (
        expect.get("REASON"), [(f["rule"], f["severity"], f["message"][:160])
                               for f in doc["findings"]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["classic/resnet18", "bad/sigmoid_mlp20",
                                  "classic/cifar_cnn_bn", "classic/plain_cnn20_kaiming",
                                  "classic/gru_classifier", "hf_encoders/bert_mlm"])
def test_verdict_does_not_depend_on_the_seeds(name: str) -> None:
    """Not borderline models: five initialisation seeds and five probe seeds, one verdict."""
    expect = zoo.constants(ZOO / f"{name}.py")
    verdicts = {}
    for seed in range(5):
        doc = _doc(name, seed=seed, init_seed=seed)
        verdicts[seed] = (doc["status"], zoo.score(expect, doc))
    assert {score for _, score in verdicts.values()} == {"ok"}, verdicts
    assert len({status for status, _ in verdicts.values()}) == 1, verdicts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_decoders/llama", "hf_decoders/gpt_neox",
                                  "hf_decoders/falcon"])
def test_meta_estimate_is_within_2x_of_the_real_weights(name: str) -> None:
    """--meta records Hugging Face's own _init_weights (transformers skips it on meta)."""
    path = str(ZOO / f"{name}.py")
    real = load_target(path)
    on_meta = load_target(path, meta=True)
    real_ratio = gradscope.analyze(real.model, real.inputs, probe=False).summary
    meta_ratio = gradscope.analyze(on_meta.model, real.inputs, probe=False,
                                   declared=on_meta.declared).summary
    factor = meta_ratio["static_min_ratio"] / real_ratio["static_min_ratio"]
    assert 0.5 <= factor <= 2.0, (meta_ratio["static_min_ratio"], real_ratio["static_min_ratio"])
