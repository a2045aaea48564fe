"""cwdpo/methods.py: the registry is the one list of methods — the schema agrees with it, and each entry's
loss is the paper's loss of cwdpo/losses.py with the recipe's hyperparameters."""
import os

import pytest
import torch
import yaml

from conftest import REPO
from cwdpo import losses as L
from cwdpo.methods import REGISTRY, STAGE1_METHODS, STAGE2_METHODS, method


def _schema_defs():
    return yaml.safe_load(open(os.path.join(REPO, "workflow", "schemas", "config.schema.yaml")))["$defs"]


def _schema_types(defs, prop) -> set:
    """The JSON types a schema property accepts (through a $ref and oneOf)."""
    if "$ref" in prop:
        prop = defs[prop["$ref"].split("/")[-1]]
    if "oneOf" in prop:
        return {t for p in prop["oneOf"] for t in _schema_types(defs, p)}
    return {prop["type"]} if "type" in prop else set()


def test_the_schemas_method_enums_are_the_registrys_stages():
    defs = _schema_defs()
    assert tuple(defs["stage1_recipe"]["properties"]["method"]["enum"]) == STAGE1_METHODS == ("sft", "sft_c")
    assert tuple(defs["stage2_recipe"]["properties"]["method"]["enum"]) == STAGE2_METHODS == \
        ("dpo", "focal_dpo", "cw_dpo")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_hyperparameter_of_a_method_is_a_recipe_key_with_the_registrys_default_and_type(name):
    defs = _schema_defs()
    m = REGISTRY[name]
    recipe = defs[f"stage{m.stage}_recipe"]["properties"]
    defaults = defs["hparams" if m.stage == 1 else "stage2_hparams"]["properties"]  # stage{1,2}.defaults
    for key, hp in m.hparams.items():
        assert key in recipe, f"{name}.{key}: not a stage{m.stage} recipe key"
        assert defaults[key]["default"] == hp.default, f"{name}.{key}: schema default differs from the registry"
        assert hp.type in _schema_types(defs, recipe[key]), f"{name}.{key}: schema type differs"


def test_an_unknown_method_is_refused_naming_the_known_ones():
    from cwdpo.train import CWDPOTrainer
    with pytest.raises(ValueError, match="unknown method 'ipo'; allowed: sft, sft_c, dpo, focal_dpo, cw_dpo"):
        CWDPOTrainer(method="ipo", hparams={}, encoder=None)
    with pytest.raises(ValueError, match="unknown method"):
        method("ipo")


def test_batch_kinds():
    assert {n: m.batch for n, m in REGISTRY.items()} == {"sft": "sft", "sft_c": "sft_c", "dpo": "pair",
                                                         "focal_dpo": "pair", "cw_dpo": "pair"}


def _defaults(name, **over):
    return {**{k: h.default for k, h in REGISTRY[name].hparams.items()}, **over}


def test_stage1_entries_compute_the_papers_losses():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(6, generator=g) * 3, torch.rand(6, generator=g) * 3
    loss, _ = REGISTRY["sft"].loss(pos, neg[:0], {})
    assert torch.equal(loss, pos.mean())
    hp = _defaults("sft_c", margin=2.5, lam=0.7)
    loss, info = REGISTRY["sft_c"].loss(pos, neg, hp)
    assert torch.allclose(loss, pos.mean() + 0.7 * torch.clamp(2.5 - neg.mean(), min=0))
    hard, _ = REGISTRY["sft_c"].loss(pos, neg, {**hp, "hard": True, "hard_lam": 50.0})
    assert torch.allclose(hard, pos.mean() + 50.0 * torch.clamp(2.5 - neg.mean(), min=0))


def test_stage2_entries_compute_the_papers_losses():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 4 - 20 for _ in range(4))
    avg_r = torch.randn(5, generator=g, dtype=torch.float64) - 4
    beta, gamma, floor, tau = 0.3, 1.5, -4.0, 0.7
    z = beta * ((pc - rc) - (pr - rr))
    dpo, _ = REGISTRY["dpo"].loss(pc, pr, rc, rr, avg_r, _defaults("dpo", beta=beta))
    assert torch.allclose(dpo, -torch.nn.functional.logsigmoid(z))
    focal, _ = REGISTRY["focal_dpo"].loss(pc, pr, rc, rr, avg_r, _defaults("focal_dpo", beta=beta, gamma=gamma))
    p = torch.sigmoid(z)
    assert torch.allclose(focal, -(1 - p) ** gamma * torch.log(p))
    hp = _defaults("cw_dpo", beta=beta, l_floor=floor, tau=tau)
    cw, info = REGISTRY["cw_dpo"].loss(pc, pr, rc, rr, avg_r, hp)
    w_c = torch.sigmoid((avg_r - floor) / tau)
    assert torch.allclose(cw, -torch.nn.functional.logsigmoid(beta * ((pc - rc) - w_c * (pr - rr))))
    assert torch.allclose(info["w_c"], w_c)
    nocool, info = REGISTRY["cw_dpo"].loss(pc, pr, rc, rr, avg_r, {**hp, "cooling": False})
    assert torch.allclose(nocool, dpo) and torch.equal(info["w_c"], torch.ones_like(avg_r))
    # the registry calls cwdpo/losses.py (one implementation of each loss)
    assert torch.equal(cw, L.cw_dpo_loss(pc, pr, rc, rr, avg_r, beta=beta, l_floor=floor, tau=tau)[0])


def test_a_recipe_extends_another_recipe_and_states_only_what_differs():
    """`extends`: the parent's resolved settings (its own `extends` too), then the recipe's; the default config's
    ablations state only the setting that differs from cw_dpo, and resolve to what they were written out as."""
    from cwdpo.config import deep_merge, default_config_path, load_config, stage1_recipe, stage2_recipe
    c = load_config(default_config_path())
    full = stage2_recipe(c, "cw_dpo")
    assert full["filter"] == {"enabled": True, "k": 2.0} and "extends" not in full
    assert stage2_recipe(c, "cw_dpo_floor-3") == {**full, "l_floor": -3.0}
    assert stage2_recipe(c, "cw_dpo_nofilter") == {**full, "filter": {"enabled": False, "k": 2.0}}
    assert stage2_recipe(c, "cw_dpo_nocool") == {**full, "cooling": False}
    assert stage1_recipe(c, "sft_c_hard") == {**stage1_recipe(c, "sft_c"), "hard": True}
    # a chain: the grandparent's settings reach the grandchild, the nearest setting wins
    c2 = deep_merge(c, {"stage2": {"recipes": {"a": {"extends": "cw_dpo_floor-3", "tau": 0.5},
                                               "b": {"extends": "a", "l_floor": -4.0}}}})
    assert stage2_recipe(c2, "b") == {**full, "l_floor": -4.0, "tau": 0.5}
    # a change to the parent reaches every recipe that extends it
    c3 = deep_merge(c, {"stage2": {"recipes": {"cw_dpo": {"filter": {"k": 3.0}}}}})
    assert all(stage2_recipe(c3, r)["filter"]["k"] == 3.0 for r in ("cw_dpo_floor-3", "cw_dpo_rho0"))
