"""ctest's entry: run_tests.py MODULE [--needs PACKAGE]: the unittest module MODULE; exit 77
(ctest's SKIP_RETURN_CODE) saying why when PACKAGE cannot be imported."""
import importlib
import sys
import unittest

args = sys.argv[1:]
module = args[0]
if "--needs" in args:
    package = args[args.index("--needs") + 1]
    try:
        importlib.import_module(package)
    except ImportError as e:
        print(f"SKIP {module}: {package} is not installed ({e}); scripts/setup.sh installs it "
              "into .deps/pyclient")
        sys.exit(77)
sys.exit(unittest.main(module=module, argv=[sys.argv[0], "-v"], exit=False).result.wasSuccessful()
         is False)
