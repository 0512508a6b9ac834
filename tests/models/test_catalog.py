"""The model catalog (specs as data) and the registry that builds models from them."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from triage.models import catalog
from triage.models.base import FindingModel, ModelOutput
from triage.models.catalog import builtin_spec, builtin_specs, load_specs
from triage.models.registry import FACTORIES, ModelRegistry, RuntimeOptions
from triage.models.spec import ModelSpec, SpecError
from triage.models.store import ModelStore

CHEST = "xrv-densenet121-res224-all"
HEAD = "blast-ct-v1"


def _doc(base: str = CHEST, /, **changes: Any) -> dict[str, Any]:
    """The shipped spec ``base`` as a JSON document, with top-level fields changed."""
    doc = copy.deepcopy(builtin_spec(base).to_json())
    doc.update(changes)
    return doc


def _write(folder: Path, filename: str, doc: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Shipped specs


def test_builtin_specs_parse_with_unique_names() -> None:
    specs = builtin_specs()
    names = [s.name for s in specs]
    assert {HEAD, CHEST} <= set(names)
    assert len(names) == len(set(names))
    for spec in specs:
        assert builtin_spec(spec.name) is spec
        assert spec.kind in FACTORIES
        assert spec.weights, spec.name


def test_every_finding_reads_outputs_that_exist() -> None:
    for spec in builtin_specs():
        assert spec.findings, spec.name
        for f in spec.findings:
            assert f.outputs and set(f.outputs) <= set(spec.outputs), (spec.name, f.code)


def test_builtin_specs_round_trip_through_json() -> None:
    for spec in builtin_specs():
        again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
        assert again == spec


def test_chest_spec_matches_its_network() -> None:
    spec = builtin_spec(CHEST)
    assert len(spec.outputs) == 18
    assert len(spec.params["op_threshs"]) == len(spec.outputs)
    assert spec.input.shape == (1, 224, 224)
    assert spec.input.value_range == (-1024.0, 1024.0)
    assert spec.weights[0].sha256 is None  # upstream publishes none: trust on first use


def test_unknown_builtin_spec_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="no-such-model"):
        builtin_spec("no-such-model")


def test_finding_specs_name_the_critical_findings() -> None:
    findings = catalog.finding_specs()
    assert findings["intracranial_haemorrhage"].critical
    assert findings["pneumothorax"].critical
    assert findings["pneumothorax"].escalate_to == "critical"
    assert not findings["pleural_effusion"].critical
    critical = catalog.critical_findings()
    assert "intracranial_haemorrhage" in critical and "pneumothorax" in critical
    assert "pleural_effusion" not in critical


# --------------------------------------------------------------------------------------------
# Broken documents


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("outputs"), "outputs"),
        (lambda d: d.update(version=["1", "0"]), "version"),
        (lambda d: d.update(task="detection"), "task"),
        (lambda d: d["input"].update(value_range="wide"), "input.value_range"),
        (lambda d: d["findings"][0].update(threshold="high"), "findings.0.threshold"),
        (lambda d: d["weights"][0].pop("filename"), "weights.0.filename"),
    ],
    ids=["missing-outputs", "version-list", "task", "value-range", "threshold", "filename"],
)
def test_from_json_names_the_broken_field(change: Any, field: str) -> None:
    doc = _doc()
    change(doc)
    with pytest.raises(SpecError) as info:
        ModelSpec.from_json(doc, source="site/broken.json")
    message = str(info.value)
    assert "site/broken.json" in message
    assert field in message


def test_from_json_refuses_a_finding_on_an_unknown_output() -> None:
    doc = _doc()
    doc["findings"][0]["outputs"] = ["Pneumothorax", "Unicorn"]
    with pytest.raises(SpecError, match="pneumothorax.*Unicorn"):
        ModelSpec.from_json(doc)


def test_from_json_refuses_a_duplicate_finding_code() -> None:
    doc = _doc()
    doc["findings"].append(copy.deepcopy(doc["findings"][0]))
    with pytest.raises(SpecError, match="twice"):
        ModelSpec.from_json(doc)


def test_from_json_refuses_unknown_ensemble_members() -> None:
    with pytest.raises(SpecError, match="member_order"):
        ModelSpec.from_json(_doc(HEAD, member_order=[1, 13]))


# --------------------------------------------------------------------------------------------
# load_specs: shipped specs, a site folder, the enabled list


def test_load_specs_defaults_to_the_shipped_set() -> None:
    assert load_specs() == builtin_specs()


def test_site_folder_replaces_a_shipped_spec_and_adds_one(tmp_path: Path) -> None:
    site = tmp_path / "specs"
    _write(site, "chest.json", _doc(version="2.0.0-site"))
    _write(site, "extra.json", _doc(name="site-chest", version="0.1.0"))
    specs = load_specs(site)
    by_name = {s.name: s for s in specs}
    assert [s.name for s in specs].count(CHEST) == 1
    assert by_name[CHEST].version == "2.0.0-site"
    assert by_name["site-chest"].version == "0.1.0"
    assert by_name[HEAD] == builtin_spec(HEAD)
    # The shipped catalog itself is untouched.
    assert builtin_spec(CHEST).version == "1.0.0"


def test_enabled_list_selects_and_orders(tmp_path: Path) -> None:
    site = tmp_path / "specs"
    _write(site, "extra.json", _doc(name="site-chest"))
    specs = load_specs(site, ["site-chest", HEAD])
    assert [s.name for s in specs] == ["site-chest", HEAD]
    assert [s.name for s in load_specs(None, [CHEST])] == [CHEST]
    assert [s.name for s in load_specs(None, [CHEST, HEAD])] == [CHEST, HEAD]
    assert [s.name for s in load_specs(None, [HEAD, CHEST])] == [HEAD, CHEST]


def test_unknown_enabled_name_lists_the_installed_models() -> None:
    with pytest.raises(SpecError) as info:
        load_specs(None, [CHEST, "no-such-model"])
    message = str(info.value)
    assert "no-such-model" in message and "TRIAGE_MODELS" in message
    assert CHEST in message and HEAD in message


def test_missing_site_folder_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_specs(tmp_path / "absent")


def test_invalid_site_file_names_the_file(tmp_path: Path) -> None:
    site = tmp_path / "specs"
    site.mkdir()
    (site / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SpecError, match="broken.json.*not valid JSON"):
        load_specs(site)
    (site / "broken.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SpecError, match="broken.json.*JSON object"):
        load_specs(site)
    bad = _doc(name="site-chest")
    del bad["kind"]
    _write(site, "broken.json", bad)
    with pytest.raises(SpecError, match="broken.json.*kind"):
        load_specs(site)


# --------------------------------------------------------------------------------------------
# The registry


class _StubModel(FindingModel[None, None]):
    """A model that is only built, never run (the registry's bookkeeping is under test)."""

    def __init__(self, spec: ModelSpec, options: RuntimeOptions) -> None:
        self.spec = spec
        self.options = options

    def prepare(self, paths: Sequence[Path]) -> None:
        return None

    def predict(self, prepared: None) -> None:
        return None

    def interpret(self, prepared: None, raw: None, series_uid: str) -> ModelOutput:
        return ModelOutput(findings=[])

    def weights_sha256(self) -> tuple[str, ...]:
        return ()


class _CountingFactory:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec, options: RuntimeOptions) -> _StubModel:
        with self._lock:
            self.calls.append(spec.name)
        return _StubModel(spec, options)


@pytest.fixture()
def options(tmp_path: Path) -> RuntimeOptions:
    return RuntimeOptions(store=ModelStore(tmp_path / "cache"), device="cpu")


def test_registry_refuses_an_unknown_kind(options: RuntimeOptions) -> None:
    odd = ModelSpec.from_json(_doc(name="odd", kind="quantum-net"))
    with pytest.raises(SpecError) as info:
        ModelRegistry([builtin_spec(HEAD), odd], options)
    message = str(info.value)
    assert "odd" in message and "quantum-net" in message
    assert "xrv-densenet" in message  # the known kinds


def test_registry_refuses_two_specs_with_one_name(options: RuntimeOptions) -> None:
    with pytest.raises(SpecError, match="share a name"):
        ModelRegistry([builtin_spec(CHEST), builtin_spec(CHEST)], options)


def test_registry_builds_each_model_once(options: RuntimeOptions) -> None:
    factory = _CountingFactory()
    registry = ModelRegistry(
        builtin_specs(), options, {"blast-ct": factory, "xrv-densenet": factory}
    )
    assert factory.calls == []  # nothing is built before it is asked for
    assert registry.specs == builtin_specs()
    chest = registry.model(CHEST)
    assert registry.model(CHEST) is chest
    assert factory.calls == [CHEST]
    head = registry.model(HEAD)
    assert registry.model(HEAD) is head and head is not chest
    assert sorted(factory.calls) == sorted([CHEST, HEAD])
    assert isinstance(chest, _StubModel) and chest.spec is builtin_spec(CHEST)
    assert chest.options is options


def test_registry_builds_once_under_concurrent_requests(options: RuntimeOptions) -> None:
    factory = _CountingFactory()
    registry = ModelRegistry([builtin_spec(CHEST)], options, {"xrv-densenet": factory})
    n = 8
    barrier = threading.Barrier(n)
    got: list[FindingModel[Any, Any]] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        model = registry.model(CHEST)
        with lock:
            got.append(model)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert factory.calls == [CHEST]
    assert len(got) == n and all(m is got[0] for m in got)


def test_registry_resolves_module_function_factories(options: RuntimeOptions) -> None:
    """The shipped factories are ``"module:function"`` strings, imported on first use."""
    from triage.models.chest import ChestXrayModel

    registry = ModelRegistry([builtin_spec(CHEST)], options)
    model = registry.model(CHEST)
    assert isinstance(model, ChestXrayModel)
    assert model.store is options.store
    assert str(model.device) == "cpu"
