"""`pip install ./python` builds the API descriptor from proto/ into the installed package, which
then imports and works from anywhere without the source tree."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

import support

REPO = os.path.dirname(os.path.dirname(support.HERE))


class InstallTest(unittest.TestCase):
    def test_pip_install(self):
        with tempfile.TemporaryDirectory() as d:
            # A copy of python/, so that the in-tree build leaves the checkout as it was.
            src = os.path.join(d, "src")
            shutil.copytree(os.path.join(REPO, "python"), src, ignore=shutil.ignore_patterns(
                "tests", "_generated", "build", "*.egg-info", "__pycache__"))
            site = os.path.join(d, "site")
            env = dict(os.environ, RINGATTN_PROTO_DIR=os.path.join(REPO, "proto"),
                       PIP_ROOT_USER_ACTION="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
            env.pop("RINGATTN_DESCRIPTOR", None)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--target", site, src],
                           check=True, env=env, cwd=d)
            self.assertTrue(os.path.isfile(
                os.path.join(site, "ringattn", "_generated", "ringattn_v1.desc")))
            # Only the installed copy on the path, run from elsewhere.
            deps = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                    if p and os.path.abspath(p) != os.path.join(REPO, "python")]
            env["PYTHONPATH"] = os.pathsep.join([site] + deps)
            check = textwrap.dedent("""
                import ringattn, ringattn._proto as p
                assert ringattn.__file__.startswith(%r), ringattn.__file__
                assert p._descriptor_path().startswith(%r), p._descriptor_path()
                r = p.AttendRequest(); r.options.window_left = 2
                assert r.options.HasField("window_left")
                print("installed", ringattn.__version__)
            """ % (site, site))
            out = subprocess.run([sys.executable, "-c", check], env=env, cwd=d,
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn("installed 0.1.0", out.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)
