"""The house rules of the layout, checked: one-way imports, a self-contained package, self-contained checkpoints.

See ../shared/docs/layout.md: imports run from the command line down to the configs; `modeling_*` files import
only siblings (they are shipped inside checkpoints); the package works from a wheel; a saved folder loads where the
package is not installed.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA, run_python, tiny_model
from test_peft import adapted, predict
from transformers import AutoModel

from imedsam_hf import IMedSamProcessor, save_pretrained_full
from imedsam_hf.cli import main as cli_main

PACKAGE = REPO_ROOT / "imedsam_hf"
# Files a checkpoint carries (transformers copies the modeling/processing files and their relative imports).
SHIPPED = {
    "configuration_imedsam",
    "modeling_imedsam",
    "modeling_tinyvit",
    "frequency_adapter_layers",
    "processing_imedsam",
}
# Blocks `import imedsam_hf` in a subprocess: the package is not there.
WITHOUT_PACKAGE = "import sys\nsys.modules['imedsam_hf'] = None\n"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """Package modules `name` imports, anywhere in the file (functions included), -> where ("top" / "function")."""
    found: dict[str, list[str]] = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in child.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("imedsam_hf"):
                    found.setdefault(target, []).append(inner)
            visit(child, inner)

    visit(ast.parse(path.read_text()), "top")
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for target in graph.get(node, {}):
            if target == "imedsam_hf":  # `from . import __version__`: the package's own __init__ names
                continue
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_imports_run_one_way_with_no_cycle():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    hidden = {name: [t for t, where in targets.items() if "function" in where] for name, targets in graph.items()}
    assert not any(hidden.values()), (
        f"package imports hidden inside functions: { {k: v for k, v in hidden.items() if v} }"
    )


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
COMMAND_ROOMS = ("imedsam_hf.commands", "imedsam_hf.cli", "imedsam_hf.__main__")


def test_library_rooms_never_print_exit_or_name_a_flag():
    """Only the commands room (and cli.py) prints, exits and speaks in flags; the library returns results and raises
    errors naming files and Python arguments (`mask_values`), which a command shows as its flags."""
    found = []
    for name, path in package_modules().items():
        if name.startswith(COMMAND_ROOMS):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        parts_of_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{name}:{node.lineno} print()")
            if isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", None) == "sys":
                found.append(f"{name}:{node.lineno} sys.exit")
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = "" if id(node) in docstrings | parts_of_fstrings else node.value
            else:
                continue
            # A command to run (`pip install --no-deps ...`, `imedsam convert ...`) may carry its own flags.
            if "pip install" not in text and "imedsam convert" not in text:
                found += [f"{name}:{node.lineno} names {flag}" for flag in FLAG.findall(text)]
    assert not found, found


def test_shipped_files_import_only_shipped_siblings_and_configuration_has_no_torch():
    graph = import_graph()
    for name in SHIPPED:
        targets = {t.rpartition(".")[2] for t in graph[f"imedsam_hf.{name}"]}
        assert targets <= SHIPPED, f"{name} imports {targets - SHIPPED}, which a checkpoint does not carry"
    tree = ast.parse((PACKAGE / "configuration_imedsam.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "peft")}
    # The modeling layers never touch peft's registry: the tuner package does.
    assert "imedsam_hf.frequency_adapter" not in graph["imedsam_hf.modeling_imedsam"]


def test_one_adapter_settings_schema_from_which_the_others_derive(tmp_path):
    from dataclasses import fields

    from imedsam_hf import FrequencyAdapterConfig, FrequencyAdapterSettings, IMedSamConfig, imedsam_peft_config
    from imedsam_hf.configuration_imedsam import ADAPTER_SETTINGS, RECIPE_FIELDS

    schema = FrequencyAdapterSettings()
    assert ADAPTER_SETTINGS == tuple(f.name for f in fields(FrequencyAdapterSettings))
    assert issubclass(FrequencyAdapterConfig, FrequencyAdapterSettings)  # inherited, not copied
    config = IMedSamConfig()
    for model_field, setting in RECIPE_FIELDS.items():  # the model config's recipe fields default to the schema's
        assert getattr(config, model_field) == getattr(schema, setting), model_field
    recipe = imedsam_peft_config(tiny_model(lora_rank=6, frequency_fusion_gate=True).config, adapter_dim=3)
    assert (recipe.lora_rank, recipe.fusion_gate, recipe.adapter_dim) == (6, True, 3)
    with pytest.raises(ValueError, match="Unknown adapter settings"):
        config.adapter_recipe(lora_rnak=2)
    published = save_pretrained_full(adapted(), tmp_path / "final").config
    assert tuple(published.adapter_config) == ADAPTER_SETTINGS


def test_unknown_arguments_are_errors_not_ignored(inputs):
    model = tiny_model()
    pixel_values, boxes = inputs
    with pytest.raises(TypeError, match=r"`input_box` \(did you mean `input_boxes`\?\)"):
        model(pixel_values=pixel_values, input_box=boxes)
    processor = IMedSamProcessor(image_size=64)
    with pytest.raises(TypeError, match=r"`input_box` \(did you mean `input_boxes`\?\)"):
        processor(torch.zeros(3, 20, 20).numpy().transpose(1, 2, 0), input_box=[1, 1, 5, 5])


def test_run_time_settings_are_read_at_each_call_also_under_peft(inputs):
    """`model.config.mc_passes` (and the other run-time settings) apply at once, in training and inference."""
    pixel_values, boxes = inputs
    peft_model = adapted().eval()
    base = peft_model.get_base_model()
    with torch.no_grad():
        before = peft_model(pixel_values=pixel_values, input_boxes=boxes, output_size=(16, 16)).uncertainty
        base.config.mc_passes = 7
        after = peft_model(pixel_values=pixel_values, input_boxes=boxes, output_size=(16, 16)).uncertainty
        base.config.refine_ratio = 0.5
        refined = peft_model(pixel_values=pixel_values, input_boxes=boxes, output_size=(16, 16)).refined
    assert not torch.equal(before, after)  # 7 passes, not the 2 the decoder was built with
    assert refined.flatten(1).sum(1).tolist() == [128, 128]


def test_push_to_hub_uploads_the_complete_folder_with_the_projects_card(tmp_path, monkeypatch):
    import imedsam_hf.modeling_imedsam as modeling

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()})
            return "ok"

    monkeypatch.setattr(modeling, "HfApi", FakeApi)
    tiny_model().push_to_hub("org/i-medsam-tiny")
    assert {"config.json", "model.safetensors", "modeling_imedsam.py", "preprocessor_config.json"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    assert "I-MedSAM" in card and "automatically generated" not in card


def _convert_tiny_sam(tmp_path: Path) -> Path:
    from test_convert import TINY_SAM
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(tmp_path / "sam")
    out = tmp_path / "converted"
    assert cli_main(["convert", "sam", "--checkpoint", str(tmp_path / "sam"), "--output", str(out)]) == 0
    return out


def _install_wheel(tmp_path: Path) -> Path:
    """`pip install .` (not editable), done as pip does it for a pure-Python wheel: build it, unpack it."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Build from a copy of what the build reads: building in the checkout leaves build/ there, whose stale files a
    # later build would pack.
    shutil.copytree(PACKAGE, source / "imedsam_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*command, str(source)], check=True)
    with zipfile.ZipFile(next(wheels.glob("imedsam_hf-*.whl"))) as archive:
        archive.extractall(target)
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "imedsam = imedsam_hf.cli:main" in archive.read(entry_points).decode()
    return target


# What runs in the fresh interpreter, in order. Phase 1 cannot import the package at all; phase 2 sees only the
# copy unpacked from the wheel. {placeholders} are filled by the fixture.
FRESH_INTERPRETER = """
import importlib, json, sys, types
import torch
from transformers import AutoModel, AutoProcessor
pixel_values, boxes = torch.load({inputs!r})

def logits_of(model, name):
    with torch.no_grad():
        torch.save(model(pixel_values=pixel_values, input_boxes=boxes, output_size=(24, 20)).logits, f"{out}/{{name}}.pt")

# 1. Without the package: saved folders load with trust_remote_code; the adapter says how to get the package.
sys.modules["imedsam_hf"] = None
for name, folder in {folders!r}.items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    logits_of(model, name)
from peft import PeftConfig, PeftModel
try:
    PeftConfig.from_pretrained({adapter!r})
except KeyError as error:  # peft's own lookup: the saved type name itself says what to do
    print("adapter without the package:", error)

# 2. The package from the wheel only. Each module in a clean state, its package's __init__ an empty stub: it
# imports what it needs itself, with no cycle.
del sys.modules["imedsam_hf"]
sys.path.insert(0, {target!r})
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "imedsam_hf" or m.startswith("imedsam_hf.")]:
        del sys.modules[loaded]
    if name != "imedsam_hf":
        stub = types.ModuleType("imedsam_hf")
        stub.__path__ = [{target!r} + "/imedsam_hf"]
        sys.modules["imedsam_hf"] = stub
    assert importlib.import_module(name).__file__.startswith({target!r}), name
print("each module alone:", len({modules!r}))
for loaded in [m for m in sys.modules if m == "imedsam_hf" or m.startswith("imedsam_hf.")]:
    del sys.modules[loaded]

# 3. `import imedsam_hf` registers the PEFT type: the adapter loads in this fresh process.
import imedsam_hf
base = AutoModel.from_pretrained({plain!r})
logits_of(PeftModel.from_pretrained(base, {adapter!r}).eval(), "adapter")

# 4. The evaluate command and the model card (its template is package data) from the wheel.
from imedsam_hf.cli import main
code = main(["evaluate", "--model", {plain!r}, "--data-dir", {data!r}, "--split", "all", "--limit", "1",
             "--json", f"{out}/eval.json"])
assert code == 0, code
from imedsam_hf.model_card import write_model_card
config = dict(model={{}}, data=dict(name="demo", split_seed=0, box_jitter=0.1, data_dir="d"),
              training=dict(output_dir="o", epochs=1, batch_size=1, gradient_accumulation_steps=1, weight_decay=0.0,
                            learning_rate=1e-4, implicit_learning_rate=1e-3, mixed_precision="no", dice_weight=0.8,
                            bce_weight=0.2, fine_weight_warmup_epochs=1), hub={{}})
write_model_card({plain!r}, config, json.load(open(f"{out}/eval.json")), {{"test": 1}}, 10, 100)
print("wheel ok")
"""


@pytest.fixture(scope="module")
def fresh_interpreter(tmp_path_factory):
    """
    Every check that needs an interpreter that never imported the package, in one (starting one with torch,
    transformers and peft costs seconds here): saved folders -> AutoModel with trust_remote_code where the package
    cannot be imported (a converted, a plain and a trained model); the adapter's message there; then, from the
    installed wheel, each module imported alone, the adapter loaded after `import imedsam_hf`, `imedsam evaluate`
    and `write_model_card`. Returns the interpreter's stdout, the folders and the in-process reference logits.
    """
    tmp_path = tmp_path_factory.mktemp("fresh")
    target = _install_wheel(tmp_path)
    folders = {"converted": _convert_tiny_sam(tmp_path), "plain": tmp_path / "plain", "trained": tmp_path / "trained"}
    tiny_model().save_pretrained(folders["plain"])
    peft_model = adapted()
    save_pretrained_full(peft_model, folders["trained"])
    inputs = (
        torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        torch.tensor([[10.0, 12, 40, 50]] * 2),
    )
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = {name: predict(AutoModel.from_pretrained(folder).eval(), inputs) for name, folder in folders.items()}
    expected["adapter"] = predict(peft_model, inputs)
    installed = target / "imedsam_hf"
    modules = sorted(module_name(PACKAGE / p.relative_to(installed)) for p in installed.rglob("*.py"))
    code = FRESH_INTERPRETER.format(
        inputs=str(tmp_path / "inputs.pt"),
        out=str(tmp_path),
        folders={k: str(v) for k, v in folders.items()},
        adapter=str(folders["trained"] / "adapter"),
        target=str(target),
        modules=[m for m in modules if not m.endswith("__main__")],  # __main__ runs the CLI
        plain=str(folders["plain"]),
        data=str(SHARED_DATA / "Kvasir-SEG-sample"),
    )
    stdout = run_python(code, cwd=tmp_path, env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    return stdout, folders, {name: (tmp_path / f"{name}.pt", logits) for name, logits in expected.items()}


@pytest.mark.slow
def test_saved_folders_load_where_the_package_is_not_installed(fresh_interpreter):
    """save_pretrained of a converted, a plain and a trained model: complete folders, same outputs without it."""
    stdout, folders, expected = fresh_interpreter
    for name, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_imedsam.IMedSamModel", name
        assert (folder / "preprocessor_config.json").is_file(), name
        assert "I-MedSAM" in (folder / "README.md").read_text(), name  # the project's card, not transformers' blank
        path, logits = expected[name]
        torch.testing.assert_close(torch.load(path), logits, atol=0, rtol=0)
    message = stdout.split("adapter without the package:")[1].splitlines()[0]
    assert "pip install git+https://github.com/imedsam-hf/imedsam-hf" in message
    adapter = json.loads((folders["trained"] / "adapter" / "adapter_config.json").read_text())
    assert not Path(adapter["base_model_name_or_path"] or "").is_absolute()
    assert "imedsam-hf" in (folders["trained"] / "adapter" / "README.md").read_text()


@pytest.mark.slow
def test_each_module_imports_alone(fresh_interpreter):
    stdout, _, _ = fresh_interpreter
    assert f"each module alone: {len([n for n in package_modules() if not n.endswith('__main__')])}" in stdout


@pytest.mark.slow
def test_adapter_loads_in_a_fresh_process_after_importing_the_package(fresh_interpreter):
    _, _, expected = fresh_interpreter
    path, logits = expected["adapter"]
    torch.testing.assert_close(torch.load(path), logits, atol=0, rtol=0)


@pytest.mark.slow
def test_wheel_install_runs_evaluate_and_writes_a_model_card(fresh_interpreter):
    """`pip install .` (not editable): `imedsam evaluate` and `write_model_card` work from the wheel alone."""
    stdout, folders, _ = fresh_interpreter
    assert "wheel ok" in stdout
    assert "| I-MedSAM | native |" in (folders["plain"] / "README.md").read_text()
