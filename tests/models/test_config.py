"""Config parsing (both RoPE spellings), RoPE scaling, and the loader's ValueErrors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

import models
from models import rope
from tests.models import fixtures as fx

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_fixture_configs():
  llama = models.LlamaConfig.from_json(fx.folder("llama3"))  # top-level rope_scaling
  assert llama.rope_theta == 500000.0 and llama.rope_scaling.rope_type == "llama3"
  assert (llama.head_dim, llama.qkv_bias, llama.tie_word_embeddings) == (16, False, False)
  qwen2 = models.LlamaConfig.from_json(fx.folder("qwen2"))
  assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.tie_word_embeddings) == (True, False, True)
  qwen3 = models.LlamaConfig.from_json(fx.folder("qwen3"))  # rope_parameters
  assert "rope_parameters" in json.loads((fx.folder("qwen3") / "config.json").read_text())
  assert (qwen3.head_dim, qwen3.qk_norm, qwen3.rope_theta) == (32, True, 1e6)


def test_both_rope_spellings_agree():
  legacy = dict(BASE, rope_theta=5e5, rope_scaling=dict(LLAMA3, type="llama3"))
  newer = dict(BASE, rope_parameters=dict(LLAMA3, rope_type="llama3", rope_theta=5e5))
  assert models.LlamaConfig.from_hf(legacy) == models.LlamaConfig.from_hf(newer)
  default = models.LlamaConfig.from_hf(dict(BASE, rope_parameters={"rope_type": "default",
                                                                   "rope_theta": 1e4}))
  assert default.rope_scaling is None and default.rope_theta == 1e4


def test_llama3_frequency_bands():
  """head_dim 16, theta 5e5, old context 64: wavelengths 6.3 (kept), 32.5 (blended),
  >= 167 (divided by the factor 8)."""
  config = models.LlamaConfig.from_hf(dict(BASE, rope_theta=5e5,
                                           rope_scaling=dict(LLAMA3, rope_type="llama3")))
  plain = 1.0 / 5e5**(np.arange(0, 16, 2) / 16)
  freqs = rope.inverse_frequencies(config)
  np.testing.assert_allclose(freqs[0], plain[0], rtol=1e-6)
  smooth = 64 / (2 * np.pi / plain[1]) - 1.0
  smooth /= 3.0
  np.testing.assert_allclose(freqs[1], (1 - smooth) * plain[1] / 8 + smooth * plain[1],
                             rtol=1e-6)
  np.testing.assert_allclose(freqs[2:], plain[2:] / 8, rtol=1e-6)


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"architectures": None}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_parameters": {"rope_type": "default"}}, "rope_theta"),
])
def test_config_errors_name_the_field(change, field):
  hf = {k: v for k, v in dict(BASE, **change).items() if v is not None}
  with pytest.raises(ValueError, match=field):
    models.LlamaConfig.from_hf(hf)


def test_missing_local_path():
  with pytest.raises(ValueError, match="local folder"):
    models.load_hf("/nonexistent/checkpoint/folder")


def test_hub_id_without_huggingface_hub(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
  with pytest.raises(ValueError, match="local folder"):
    models.load_hf("someone/some-model")


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
  folder = tmp_path / "qwen3"
  shutil.copytree(fx.folder("qwen3"), folder)
  config = json.loads((folder / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="lacks tensors"):
    models.load_hf(folder)


def test_generate_argument_errors():
  model = fx.model("qwen2")
  ids, lengths = fx.ragged_prompts("qwen2")
  with pytest.raises(ValueError, match="capacity"):
    models.generate(model, ids, 8, prompt_lengths=lengths, capacity=12)
  with pytest.raises(ValueError, match="lengths"):
    models.generate(model, ids, 2, prompt_lengths=[13, 7])
  with pytest.raises(ValueError, match="dense_layers"):
    models.generate(model, ids, 2, dense_layers=(2,))
  with pytest.raises(ValueError, match="key"):
    models.generate(model, ids, 2, temperature=1.0)
  with pytest.raises(ValueError, match="attention"):
    models.generate(model, ids, 2, attention=[None] * 3)
