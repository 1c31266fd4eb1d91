"""Issue 4 end to end: the .deb installs from Debian's archive alone, upgrades under a
running app without touching it, and removes and purges without leaving a file."""

from __future__ import annotations

import pytest
import requests

from helpers import apt_install
from load import Wrk

pytestmark = pytest.mark.e2e


def package_files(box) -> list[str]:
    listed = box.run("dpkg", "-L", "unitgen").stdout.split()
    return [path for path in listed if box.run("test", "-d", path, check=False).returncode != 0]


def installed_from_archive(box, package: str) -> bool:
    """The installed version of package is one that an http(s) archive of apt's serves."""
    lines = box.run("apt-cache", "policy", package).stdout.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("***"):
            sources = []
            for following in lines[i + 1:]:
                if not following.startswith("        "):
                    break
                sources.append(following)
            return any("http" in source for source in sources)
    return False


def test_installed_from_the_deb_with_debian_dependencies(box):
    status = box.run("dpkg-query", "-W", "-f", "${Status} ${Version}", "unitgen").stdout
    assert status.startswith("install ok installed 0.1.0")
    assert box.run("sh", "-c", "command -v unitgen").stdout.strip() == "/usr/bin/unitgen"
    # Every dependency was pulled by apt from Debian's archive (none is in the rootfs).
    for dep in ("python3-uvicorn", "python3-systemd", "python3-jinja2", "python3-httptools", "python3-uvloop"):
        assert installed_from_archive(box, dep), box.run("apt-cache", "policy", dep).stdout
    # The runtime is the packaged one, not a copy of the source tree.
    where = box.run("python3", "-c", "import unitgen_worker, unitgen; print(unitgen_worker.__file__, unitgen.__file__)")
    assert where.stdout.split() == ["/usr/lib/python3/dist-packages/unitgen_worker/__init__.py",
                                    "/usr/lib/python3/dist-packages/unitgen/__init__.py"]
    assert box.run("test", "-f", "/usr/share/man/man1/unitgen.1.gz").returncode == 0
    assert box.run("test", "-f", "/usr/share/bash-completion/completions/unitgen").returncode == 0


def test_upgrade_keeps_apps_running_and_purge_leaves_nothing(box, deploy, debs):
    app = deploy("lifecycle:app", "--cores", "2")
    pids = app.instance_pids()
    load = Wrk(f"{app.url}/", seconds=8)
    apt_install(box, f"/debs/{debs['upgrade'].name}")
    result = load.result()
    assert "upgrade1" in box.run("dpkg-query", "-W", "-f", "${Version}", "unitgen").stdout
    assert app.instance_pids() == pids, "the upgrade restarted the app's instances"
    assert result.failed == 0, result.output
    assert requests.get(app.url, timeout=5).status_code == 200
    box.run("unitgen", "uninstall", app.name)  # the app's units are the admin's, not the package's

    files = package_files(box)
    assert "/usr/bin/unitgen" in files and len(files) > 20
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    box.run(*env, "apt-get", "remove", "-y", "-q", "unitgen")
    left = [path for path in files if box.run("test", "-e", path, check=False).returncode == 0]
    assert left == []
    apt_install(box, f"/debs/{debs['current'].name}")
    box.run(*env, "apt-get", "purge", "-y", "-q", "unitgen")
    assert [path for path in files if box.run("test", "-e", path, check=False).returncode == 0] == []
    # nothing compiled or generated behind: no __pycache__, no dist-info, no doc dir
    leftovers = box.sh("find /usr/lib/python3/dist-packages /usr/share/doc /usr/bin -name '*unitgen*'").stdout
    assert leftovers == ""
    assert "unitgen" not in box.run("dpkg", "-l").stdout.split()
    # Later tests in this session use the package again.
    apt_install(box, f"/debs/{debs['current'].name}")
