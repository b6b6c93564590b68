import dataclasses
import importlib
import subprocess
import sys

import tfsubspace


def test_every_lazy_name_resolves_to_what_the_table_lists():
    for name, (module_name, attribute) in tfsubspace._LAZY.items():
        module = importlib.import_module(module_name)
        expected = module if attribute is None else getattr(module, attribute)
        assert getattr(tfsubspace, name) is expected, name


def test_every_public_name_is_documented():
    undocumented = []
    for name in tfsubspace.__all__:
        if name == "__version__":
            continue
        obj = getattr(tfsubspace, name)
        doc = (obj.__doc__ or "").strip()
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            doc = ""  # the signature dataclasses writes in place of a missing docstring
        if not doc:
            undocumented.append(name)
    assert undocumented == []


def test_import_does_not_load_tensorflow():
    code = "import sys, tfsubspace; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_one_public_name_per_thing():
    seen = {}
    for name in tfsubspace.__all__:
        seen.setdefault(id(getattr(tfsubspace, name)), []).append(name)
    assert [names for names in seen.values() if len(names) > 1] == []
    # the report's formatter is the one that takes a compress() report
    assert tfsubspace.format_report.__module__ == "tfsubspace.distill.report"
