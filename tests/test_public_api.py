import subprocess
import sys

import tfsubspace


def test_every_public_name_resolves():
    for name in tfsubspace.__all__:
        assert getattr(tfsubspace, name) is not None, name


def test_import_does_not_load_tensorflow():
    code = "import sys, tfsubspace; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
