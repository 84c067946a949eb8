import pytest
import torch.nn as nn

from loreun.erase.presets import select_parameters
from loreun.pipelines.family import UNET_PRESETS


def _modules(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _module_names(selected):
    return {k.rsplit(".", 1)[0] for k in selected}


def test_esd_x_is_exactly_cross_attention(tiny_unet):
    want = {n for n in _modules(tiny_unet) if ".attn2." in n}
    assert want and _module_names(select_parameters(tiny_unet, "esd-x", UNET_PRESETS)) == want


def test_esd_x_strict_is_keys_and_values(tiny_unet):
    got = _module_names(select_parameters(tiny_unet, "esd-x-strict", UNET_PRESETS))
    assert got and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in got)
    assert len(got) == 2 * sum(1 for n in _modules(tiny_unet) if n.endswith("attn2.to_q"))


def test_esd_u_is_everything_else(tiny_unet):
    got = _module_names(select_parameters(tiny_unet, "esd-u", UNET_PRESETS))
    assert got == {n for n in _modules(tiny_unet) if ".attn2." not in n}


def test_esd_all_is_linear_and_conv_only(tiny_unet):
    sel = select_parameters(tiny_unet, "esd-all", UNET_PRESETS)
    assert _module_names(sel) == set(_modules(tiny_unet))
    assert not any("norm" in k and "conv" not in k for k in sel)  # norms stay frozen
    assert "time_embedding.linear_1.weight" in sel  # Linear inside an embedding block counts
    params = dict(tiny_unet.named_parameters())
    assert all(sel[k] is params[k] for k in sel)


def test_presets_partition(tiny_unet):
    x = set(select_parameters(tiny_unet, "esd-x", UNET_PRESETS))
    u = set(select_parameters(tiny_unet, "esd-u", UNET_PRESETS))
    assert not x & u and x | u == set(select_parameters(tiny_unet, "esd-all", UNET_PRESETS))


@pytest.mark.parametrize("name", ["xattn", "ESD-X", ""])
def test_unknown_preset(tiny_unet, name):
    with pytest.raises(ValueError, match="choose one of esd-x, esd-x-strict, esd-u, esd-all$"):
        select_parameters(tiny_unet, name, UNET_PRESETS)


def test_empty_selection_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="selects no parameters"):
        select_parameters(model, "esd-x", UNET_PRESETS)
    assert set(UNET_PRESETS) == {"esd-x", "esd-x-strict", "esd-u", "esd-all"}


@pytest.mark.parametrize("preset", ["esd-x", "esd-u"])
def test_a_selected_module_trains_its_bias_too(tiny_unet, preset):
    """ESD trains whole modules: a preset that dropped biases would leave to_out.0.bias frozen."""
    sel = select_parameters(tiny_unet, preset, UNET_PRESETS)
    modules = dict(tiny_unet.named_modules())
    for name in _module_names(sel):
        own = {f"{name}.{p}" for p, _ in modules[name].named_parameters(recurse=False)}
        assert own <= set(sel), name
    assert any(k.endswith(".bias") for k in sel)
    want = sum(p.numel() for n in _module_names(sel) for p in modules[n].parameters(recurse=False))
    assert sum(p.numel() for p in sel.values()) == want
