"""The device side must import on an edge box without torch."""

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"


def test_core_and_device_import_without_torch():
    code = BLOCK_TORCH + (
        "import importlib, pkgutil\n"
        "import edgeadapt.core, edgeadapt.device\n"
        "for pkg in (edgeadapt.core, edgeadapt.device):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    print('torch blocked')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch blocked" in out.stdout


def test_device_cli_help_without_torch():
    code = BLOCK_TORCH + (
        "import sys\n"
        "from edgeadapt.cli import app\n"
        "sys.argv = ['edgeadapt', 'device', '--help']\n"
        "app()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device" in out.stdout.lower()
