"""The ``transformers`` model factory: Hugging Face models rebuilt from the configuration a run
stores, through an allow-list of Auto classes and the model types transformers itself defines
(never remote code, never a download)."""

from __future__ import annotations

import pytest
import torch

from recorder.models import build_model, transformers_spec
from recorder.rundir.errors import RunDirError
from recorder.rundir.spec import ModelSpec, RunSpec

BERT = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 8, "num_labels": 2}


def test_an_auto_class_outside_the_allow_list_is_refused():
    with pytest.raises(RunDirError, match="auto_class must be one of"):
        build_model(ModelSpec("transformers", {"auto_class": "AutoModel", "config": BERT}))


@pytest.mark.slow
def test_a_model_type_transformers_does_not_define_is_refused():
    for config in ({**BERT, "model_type": "my-remote-model"}, {k: v for k, v in BERT.items() if k != "model_type"}):
        with pytest.raises(RunDirError, match="not a model type transformers defines"):
            build_model(ModelSpec("transformers", {"auto_class": "AutoModelForSequenceClassification", "config": config}))


@pytest.mark.slow
def test_the_stored_configuration_rebuilds_the_model_and_no_remote_code_runs(monkeypatch):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download would fail
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{k: v for k, v in BERT.items()})
    original = AutoModelForSequenceClassification.from_config(config)
    spec = transformers_spec(original)
    # the spec goes through spec.json as JSON; auto_map (remote code) is ignored
    spec.kwargs["config"]["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model"}
    spec = RunSpec.from_json(RunSpec(spec, "classification", "cross_entropy", 2).to_json()).model
    rebuilt = build_model(spec)
    assert type(rebuilt) is type(original)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    rebuilt.load_state_dict(original.state_dict())
    ids = torch.randint(1, 10, (3, 5))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    with torch.no_grad():
        expected = original.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(rebuilt.eval()(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6)
