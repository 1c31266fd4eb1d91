"""Issue 14 end to end: `render --metrics-listen` serves each instance's request counters,
duration histogram and systemd's view of it to a real Prometheus scrape, under wrk load,
and install/uninstall handle the metrics units; under real systemd 252 and 257."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until
from load import Wrk
from testbed import free_port

pytestmark = pytest.mark.e2e

CONNECTIONS = 64
# The exporter runs as the app's user, which must be a static one (the system bus
# refuses dynamic users); www-data is in every Debian.
USER = ("--user", "www-data")


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """name -> {labels (sorted items) -> value}, as Prometheus's own parser reads the page."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def per_instance(samples, name: str, **match: str) -> dict[str, float]:
    """instance -> the sum of name's samples whose labels hold match."""
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, {}).items():
        labels = dict(labels)
        if all(labels.get(k) == v for k, v in match.items()):
            out[labels["instance"]] += value
    return dict(out)


def show(box, units: list[str]) -> list[dict[str, str]]:
    props = "MainPID,NRestarts,ActiveState,SubState,MemoryCurrent,CPUUsageNSec"
    out = box.run("systemctl", "show", "-p", props, *units).stdout
    return [dict(line.split("=", 1) for line in block.splitlines()) for block in out.strip().split("\n\n")]


def test_a_scrape_under_load_adds_up_to_what_wrk_and_systemd_say(box, deploy):
    metrics_port = free_port()
    app = deploy("lifecycle:app", "--cores", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}", *USER)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    units = [f"{app.name}@0.service", f"{app.name}@1.service"]
    # The socket is listening; the first scrape starts the exporter.
    assert app.show(f"{app.name}-metrics.socket", "ActiveState") == "active"
    before = scrape(url)
    pids = {i: int(p) for i, p in per_instance(before, "unitgen_main_pid", app=app.name).items()}
    assert set(pids) == {"0", "1"} and all(pids.values()), pids
    base = per_instance(before, "unitgen_requests_total")

    load = Wrk(f"{app.url}/", seconds=10, connections=CONNECTIONS)
    time.sleep(5)
    during = scrape(url)  # parses under load, every instance reporting
    assert set(per_instance(during, "unitgen_requests_total")) == {"0", "1"}, during.keys()
    assert sum(per_instance(during, "unitgen_connections").values()) >= CONNECTIONS / 2
    result = load.result()
    assert result.failed == 0, result.output

    # Counters files are rewritten once a second: wait until nothing is in flight and
    # two scrapes a second and a half apart agree.
    def settled():
        first = scrape(url)
        time.sleep(1.5)
        second = scrape(url)
        idle = not any(per_instance(second, "unitgen_requests_in_flight").values())
        return second if idle and per_instance(first, "unitgen_requests_total") == per_instance(
            second, "unitgen_requests_total") else None
    after = wait_until(settled, timeout=20)
    assert after is not None, "the counters did not settle after the load"
    answered = {i: n - base.get(i, 0) for i, n in per_instance(after, "unitgen_requests_total").items()}
    total = sum(answered.values())
    # wrk counts the responses it read before its deadline; each of its connections may
    # have had one more request on the wire then, which the instance answered and
    # counted but wrk never read. So the instances' total is wrk's plus 0 to 64.
    print(f"{box.suite}: wrk {result.requests} requests, instances answered {answered} (total {total}, "
          f"{total - result.requests} more than wrk)")
    assert result.requests <= total <= result.requests + CONNECTIONS
    assert per_instance(after, "unitgen_requests_total", status="2xx") == per_instance(after, "unitgen_requests_total")
    assert all(n > 0 for n in answered.values()), answered
    # Every ended request is in the histogram, once.
    count = per_instance(after, "unitgen_request_duration_seconds_count")
    unanswered = per_instance(after, "unitgen_requests_unanswered_total")
    requests_counter = per_instance(after, "unitgen_requests_total")
    assert count == {i: requests_counter[i] + unanswered.get(i, 0) for i in requests_counter}, (count, unanswered)
    assert per_instance(after, "unitgen_request_duration_seconds_bucket", le="+Inf") == count
    assert not any(unanswered.values())
    assert per_instance(after, "unitgen_swaps_total") == {"0": 0, "1": 0}
    assert per_instance(after, "unitgen_draining") == {"0": 0, "1": 0}

    # systemd's numbers, read right before and after the scrape.
    first = show(box, units)
    scraped = scrape(url)
    last = show(box, units)
    for i, (a, b) in enumerate(zip(first, last, strict=True)):
        instance = str(i)
        cpu = per_instance(scraped, "unitgen_cpu_seconds_total")[instance]
        assert int(a["CPUUsageNSec"]) / 1e9 <= cpu <= int(b["CPUUsageNSec"]) / 1e9, (a, cpu, b)
        memory = per_instance(scraped, "unitgen_memory_bytes").get(instance)
        if a["MemoryCurrent"].isdigit() and b["MemoryCurrent"].isdigit():
            low, high = sorted((int(a["MemoryCurrent"]), int(b["MemoryCurrent"])))
            assert memory is not None and low - (1 << 20) <= memory <= high + (1 << 20), (a, memory, b)
        else:  # no memory accounting for this cgroup (some containers): no sample either
            assert memory is None, (a["MemoryCurrent"], memory)
        print(f"{box.suite}: instance {instance}: MemoryCurrent {a['MemoryCurrent']} / {memory} / "
              f"{b['MemoryCurrent']}, CPU {int(a['CPUUsageNSec']) / 1e9:.3f} <= {cpu:.3f} <= "
              f"{int(b['CPUUsageNSec']) / 1e9:.3f} s")
        assert per_instance(scraped, "unitgen_main_pid")[instance] == int(a["MainPID"]) == pids[instance]
        assert per_instance(scraped, "unitgen_restarts_total")[instance] == int(a["NRestarts"])
        state = {(labels["state"], labels["sub_state"]) for labels in map(dict, scraped["unitgen_state"])
                 if labels["instance"] == instance}
        assert state == {(a["ActiveState"], a["SubState"])}


def test_durations_land_in_their_buckets(box, deploy):
    metrics_port = free_port()
    app = deploy("lifecycle:app", "--cores", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}", *USER)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    for _ in range(3):
        assert requests.get(f"{app.url}/sleep?s=0.3", timeout=10).status_code == 200

    def counted():
        samples = scrape(url)
        return samples if per_instance(samples, "unitgen_request_duration_seconds_count").get("0") == 3 else None
    samples = wait_until(counted, timeout=10, step=0.5)
    assert samples is not None
    assert per_instance(samples, "unitgen_request_duration_seconds_bucket", le="0.25") == {"0": 0}
    assert per_instance(samples, "unitgen_request_duration_seconds_bucket", le="0.5") == {"0": 3}
    assert 0.9 <= per_instance(samples, "unitgen_request_duration_seconds_sum")["0"] < 1.5


def test_the_exporter_is_unprivileged_sandboxed_and_apart_from_the_app(box, deploy):
    metrics_port = free_port()
    app = deploy("lifecycle:app", "--cores", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}", *USER)
    scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    service = f"{app.name}-metrics.service"
    pid = app.show(service, "MainPID")
    status = box.run("cat", f"/proc/{pid}/status").stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    instance_pid = app.show(f"{app.name}@0.service", "MainPID")
    instance_uid = next(line.split()[1] for line in box.run("cat", f"/proc/{instance_pid}/status").stdout.splitlines()
                        if line.startswith("Uid:"))
    assert uid != "0" and uid == instance_uid  # the app's own (dynamic) user, never root
    assert box.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")[1:4] == ["-I", "-m", "unitgen.metrics"]
    # The app's port does not serve the metrics, nor the metrics port the app.
    assert requests.get(f"{app.url}/metrics", timeout=10).text.startswith("pid ")
    assert requests.get(f"http://127.0.0.1:{metrics_port}/", timeout=10).text.startswith("# HELP")
    exposure = box.run("systemd-analyze", "security", "--no-pager", service).stdout.strip().splitlines()[-1]
    print(f"{box.suite}: {exposure}")
    verify = box.sh(f"systemd-analyze verify /etc/systemd/system/{app.name}-metrics.*", check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_install_without_metrics_and_uninstall_remove_the_metrics_units(box, deploy):
    metrics_port = free_port()
    app = deploy("lifecycle:app", "--cores", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}", *USER)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    scrape(url)
    files = [f"/etc/systemd/system/{app.name}-metrics.socket", f"/etc/systemd/system/{app.name}-metrics.service"]
    assert box.run("ls", *files, check=False).returncode == 0
    # Installed again without --metrics-listen: the metrics units go, the app stays.
    render = ["unitgen", "render", "--app", "lifecycle:app", "--name", app.name, "--cores", "1",
              "--listen", f"127.0.0.1:{app.port}", "--workdir", "/srv/apps", *USER]
    box.run("unitgen", "install", "-", input=box.run(*render).stdout)
    assert box.run("ls", *files, check=False).returncode != 0
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert "--metrics" not in box.run("systemctl", "cat", f"{app.name}@.service").stdout
    assert requests.get(f"{app.url}/", timeout=10).status_code == 200
    # With metrics again, on another port: the new address serves, the old one is closed.
    new_port = free_port()
    box.run("unitgen", "install", "-", input=box.run(*render, "--metrics-listen", f"127.0.0.1:{new_port}").stdout)
    assert wait_until(lambda: "unitgen_main_pid" in scrape(f"http://127.0.0.1:{new_port}/metrics"), timeout=10)
    # Installed again with --no-start: the app serves on, and so do its metrics.
    box.run("unitgen", "install", "--no-start", "-",
            input=box.run(*render, "--metrics-listen", f"127.0.0.1:{new_port}").stdout)
    assert wait_until(lambda: "unitgen_main_pid" in scrape(f"http://127.0.0.1:{new_port}/metrics"), timeout=10)
    # `unitgen uninstall NAME-metrics` is not about this app's metrics units.
    other = box.run("unitgen", "uninstall", f"{app.name}-metrics", check=False)
    assert other.returncode == 1 and f"no app named '{app.name}-metrics' is installed" in other.stderr, other.stderr
    assert box.run("systemctl", "is-active", f"{app.name}-metrics.socket").stdout.strip() == "active"
    box.run("unitgen", "uninstall", app.name)
    assert box.run("ls", *files, check=False).returncode != 0
    assert box.run("systemctl", "is-active", f"{app.name}-metrics.socket", check=False).stdout.strip() == "inactive"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{new_port}/metrics", timeout=5)


def test_an_app_named_like_another_apps_metrics_units_is_refused(box, deploy):
    metrics_port = free_port()
    app = deploy("lifecycle:app", "--cores", "1", "--metrics-listen", f"127.0.0.1:{metrics_port}", *USER)
    render = ["unitgen", "render", "--app", "lifecycle:app", "--name", f"{app.name}-metrics", "--cores", "1",
              "--listen", f"127.0.0.1:{free_port()}", "--workdir", "/srv/apps"]
    result = box.run("unitgen", "install", "-", input=box.run(*render).stdout, check=False)
    assert result.returncode == 1 and "whose units are named" in result.stderr, result.stderr
    assert box.run("grep", "-c", "Prometheus metrics socket",
                   f"/etc/systemd/system/{app.name}-metrics.socket").stdout.strip() == "1"
