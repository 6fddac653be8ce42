"""The recipe options users expect a config key away: dropout, QK-norm and the z-loss. Each
trains, is counted, and exports (QK-norm as Qwen3, dropout off) or is refused; the run that
trains all three at once is tests/test_mixture.py's mixture run, which exports it too."""

from __future__ import annotations

import pytest
import torch

from dist_lm.config.io import load_config
from dist_lm.config.schema import ConfigError, ModelConfig
from dist_lm.model.loss import TrainingOptions
from dist_lm.model.transformer import Transformer

RECIPE = ["model.dropout=0.1", "model.qk_norm=true", "optim.z_loss=1e-4"]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 512, "seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 4, **kw})


def test_dropout_acts_while_training_only():
    torch.manual_seed(0)
    model = Transformer(tiny(dropout=0.2))
    x = torch.randint(0, 512, (2, 32))
    assert not torch.equal(model(x), model(x))  # two training forwards draw different masks
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = Transformer(tiny())
    assert torch.equal(plain(x), plain(x))


def test_z_loss_adds_the_squared_log_partition_function():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    ce = model(x, y).total
    model.use(TrainingOptions(z_loss_coef=1e-2))
    with_z = model(x, y)
    logits = model(x).float().flatten(0, 1)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(with_z.total, ce + 1e-2 * z)
    torch.testing.assert_close(with_z.z, z)
    torch.testing.assert_close(with_z.cross_entropy, ce)  # what the log reports: the parts, apart
    with_z.total.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dropout=1", "model.dropout: must be in [0, 1)"),
        ("optim.z_loss=-1", "optim.z_loss: must be >= 0"),
        ("model.qk_norm=maybe", "model.qk_norm: expected bool"),
    ],
)
def test_bad_recipe_values_get_one_line(override, fragment):
    """(The launcher prints such a ConfigError as its one line, exit 2: tests/test_cli.py.)"""
    with pytest.raises(ConfigError) as error:
        load_config("debug", [override])
    assert fragment in str(error.value) and "\n" not in str(error.value)
