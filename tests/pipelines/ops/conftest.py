import importlib.util
import sys
from pathlib import Path

_name = "raygpt_gen_test_fixtures"  # shared with tests/pipelines/generate (one tiny checkpoint per session)
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).resolve().parents[1] / "generate" / "fixtures.py")
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])
tiny_checkpoint = sys.modules[_name].tiny_checkpoint
