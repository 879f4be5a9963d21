"""states/kubeadm.yaml on the 4-node lab, with stand-in kubeadm, kubelet and kubectl.

The lab cannot run Kubernetes: its nodes have no internet (no pkgs.k8s.io, no images) and its
kernel loads no modules. So the test makes what pkgs.k8s.io would serve, locally: a flat apt
repository signed with a gpg key the test generates (InRelease, Release.key), holding .debs of
kubeadm, kubelet and kubectl whose programs are stand-ins (tests/e2e/fake_kubernetes.py: they
record their arguments and do what the state relies on -- a real CA certificate, bootstrap tokens
with a TTL, a join that checks the CA hash and the token against the control plane over the lab
network). The inventory points cluster.kubernetes.repo and repo_key at it as file:// URLs, so the
state's own path runs unchanged: curl fetches the key, gpg dearmors it, apt checks the repository's
signature against it (`signed-by`, never `trusted=yes`), the packages are installed and held.
Everything else is real: swap.off, cmdline.txt, kmod, sysctl, Debian's containerd 1.6 running with
the generated config, the stages, the results handed from node01 to the workers, the redaction.

What the lab lacks, and the test says so where it matters: writable kernel settings (nspawn mounts /proc/sys read-only; the
test makes each node's own network settings writable, as a Pi has them) and loadable modules
(br_netfilter is built into the lab's kernel, /proc/sys/net/bridge exists, but modprobe cannot load
anything: that state is the one failure on every node, and nothing depends on it).

Afterwards every node is put back as the lab made it (packages purged, files, users and mounts
removed), for the tests after this one.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from lab_harness import Lab
from test_shipped_states import MASTER, NODE_STATES, apply, assert_every_node_done, changed, failures, figures, sh

pytestmark = pytest.mark.lab

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKERS = ["node02", "node03", "node04"]
K8S_VERSION = "1.32.0-1.1"         # pkgs.k8s.io's version scheme
NODE_REPO = "/opt/pm-k8s-repo"      # the stand-in pkgs.k8s.io, in every node
WORK = "/root/pm-kubeadm"           # a copy of the shipped states, with the inventory pointing there
ADMIN = "pi"
FLANNEL = "https://github.com/flannel-io/flannel/releases/download/v0.26.1/kube-flannel.yml"
CMDLINE = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait\n"
CALLS = "/var/log/fake-kubernetes/calls.log"
# What kubeadm.yaml leaves on a node, removed afterwards.
LEFTOVERS = ("/etc/kubernetes /var/lib/kubelet /var/lib/fake-kubernetes /var/log/fake-kubernetes "
             "/etc/apt/sources.list.d/kubernetes.list /etc/apt/keyrings/kubernetes-v1.32-apt-keyring.gpg "
             "/etc/sysctl.d/k8s.conf /etc/modules-load.d/pimaster.conf /etc/containerd "
             f"{NODE_REPO}")


# ---------------------------------------------------------------------------------------------
# The stand-in pkgs.k8s.io: .debs of the fake programs, in a flat repository signed with a new key

KUBELET_UNIT = """[Unit]
Description=kubelet: The Kubernetes Node Agent (pimaster test stand-in)
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def run(*argv: str, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    return subprocess.run(argv, cwd=cwd, input=input, check=True, capture_output=True).stdout


def build_deb(work: Path, package: str, files: dict[str, tuple[str, int]]) -> Path:
    root = work / "build" / package
    arch = run("dpkg", "--print-architecture").decode().strip()
    for path, (text, mode) in {**files, "DEBIAN/control": (
            f"Package: {package}\nVersion: {K8S_VERSION}\nArchitecture: {arch}\nMaintainer: pimaster tests "
            f"<tests@pimaster.invalid>\nSection: admin\nPriority: optional\n"
            f"Description: {package} stand-in for pimaster's lab tests\n", 0o644)}.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    deb = work / "repo" / f"{package}_{K8S_VERSION}_{arch}.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb))
    return deb


def build_repository(work: Path) -> tuple[str, str]:
    """The repository as a base64 tarball for the nodes, and the signing key's fingerprint."""
    fake = (HERE / "fake_kubernetes.py").read_text()
    for program in ("kubeadm", "kubectl"):
        build_deb(work, program, {f"usr/bin/{program}": (fake, 0o755)})
    build_deb(work, "kubelet", {"usr/bin/kubelet": (fake, 0o755),
                                "lib/systemd/system/kubelet.service": (KUBELET_UNIT, 0o644)})
    repo = work / "repo"
    packages = run("dpkg-scanpackages", "--multiversion", ".", "/dev/null", cwd=repo)
    (repo / "Packages").write_bytes(packages)
    release = (f"Origin: pimaster-test\nLabel: stand-in pkgs.k8s.io\n"
               f"Date: {email.utils.formatdate(usegmt=True)}\nSHA256:\n"
               f" {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n")
    (repo / "Release").write_text(release)
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ("gpg", "--batch", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", "")
    try:
        run(*gpg, "--quick-generate-key", "pimaster lab test repository <repo@pimaster.invalid>", "rsa3072", "sign",
            "1d")
        (repo / "Release.key").write_bytes(run(*gpg, "--armor", "--export"))
        run(*gpg, "--clearsign", "--digest-algo", "SHA512", "-o", str(repo / "InRelease"), str(repo / "Release"))
        listing = run(*gpg, "--with-colons", "--list-keys").decode()
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for item in sorted(repo.iterdir()):
            tar.add(item, arcname=item.name)
    return base64.b64encode(buffer.getvalue()).decode(), fingerprint


# ---------------------------------------------------------------------------------------------
# Reading the nodes

def calls(lab: Lab, node: str, program: str | None = None) -> list[list[str]]:
    """The argument lists the stand-ins were run with on NODE, in order."""
    text = sh(lab, node, f"cat {CALLS} 2>/dev/null || true")
    found = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [c["argv"] for c in found if program is None or c["program"] == program]


def kubeadm_calls(lab: Lab) -> dict[str, list[list[str]]]:
    """Node -> the kubeadm commands that change something (init, join, token create)."""
    return {node: [argv for argv in calls(lab, node, "kubeadm") if argv[:1] in (["init"], ["join"])
                   or argv[:2] == ["token", "create"]] for node in lab.nodes}


def option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def failed_output(report: dict) -> str:
    """What each failed state said, for an assertion's message."""
    return "\n".join(f"{node} {s['id']}: {s['comment']} {(s['changes'] or {}).get('stderr', '')}"
                     for node, item in report["nodes"].items() for s in item["states"] if s["status"] == "failed")


def reboot_flagged(report: dict) -> dict[str, bool]:
    return {node: item["reboot_required"] for node, item in report["nodes"].items()}


# ---------------------------------------------------------------------------------------------

@pytest.fixture
def kubernetes_lab(lab, tmp_path):
    """The lab, prepared as a Pi cluster would be for kubeadm.yaml; put back afterwards."""
    if len(Path("/proc/swaps").read_text().splitlines()) > 1:
        # /proc/swaps is host-global: swap.off in a node must never turn off the host's swap.
        pytest.skip("this machine has active swap, which swap.off in a node would see")
    tarball, fingerprint = build_repository(tmp_path)
    forward = {node: sh(lab, node, "cat /proc/sys/net/ipv4/ip_forward").strip() for node in lab.nodes}
    had_admin = True
    try:
        for node in lab.nodes:
            sh(lab, node, f"rm -rf {NODE_REPO} && mkdir -p {NODE_REPO} && base64 -d | tar -xz -C {NODE_REPO} "
                          f"&& chmod -R a+rX {NODE_REPO}", input=tarball)
            # The lab's own cmdline.txt (its PARTUUID) is kept and put back afterwards.
            sh(lab, node, "cp -a /boot/firmware/cmdline.txt /boot/firmware/cmdline.txt.pm-kept")
            lab.write_file(node, "/boot/firmware/cmdline.txt", CMDLINE)     # as on a flashed Pi
            # nspawn gives a node whose network namespace it did not make a read-only /proc/sys; a Pi's
            # kernel settings are writable. Only the node's own network settings are made so.
            sh(lab, node, "mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net")
        had_admin = lab.exec(MASTER, "id", ADMIN, check=False).returncode == 0
        if not had_admin:
            sh(lab, MASTER, f"useradd -m -s /bin/bash {ADMIN}")     # Raspberry Pi Imager's first user
        inventory = yaml.safe_load((REPO / "states" / "cluster.yaml").read_text())
        inventory["cluster"]["kubernetes"].update(repo=f"file://{NODE_REPO}/",
                                                  repo_key=f"file://{NODE_REPO}/Release.key",
                                                  admin_user=ADMIN, flannel_manifest=FLANNEL,
                                                  # This machine's image has a kubectl package of its own
                                                  # (Google Cloud SDK's), which the nodes see: pinned, apt
                                                  # replaces it with the repository's.
                                                  package_version=K8S_VERSION)
        sh(lab, MASTER, f"rm -rf {WORK} && cp -r {NODE_STATES} {WORK}")
        lab.write_file(MASTER, f"{WORK}/cluster.yaml", yaml.safe_dump(inventory, sort_keys=False))
        yield fingerprint
    finally:
        for node in lab.nodes:
            sh(lab, node, "systemctl stop kubelet containerd 2>/dev/null; "
                          "apt-mark unhold kubeadm kubelet kubectl >/dev/null 2>&1; "
                          "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q kubeadm kubelet kubectl containerd runc "
                          ">/dev/null 2>&1; "
                          f"echo {forward[node]} > /proc/sys/net/ipv4/ip_forward; umount /proc/sys/net; "
                          f"rm -rf {LEFTOVERS}; systemctl daemon-reload; systemctl reset-failed; "
                          "if [ -e /boot/firmware/cmdline.txt.pm-kept ]; then "
                          "mv /boot/firmware/cmdline.txt.pm-kept /boot/firmware/cmdline.txt; fi", check=False)
        sh(lab, MASTER, ("" if had_admin else f"userdel -r {ADMIN} 2>/dev/null; ") + f"rm -rf {WORK}", check=False)


def test_kubeadm_inits_once_workers_join_with_handed_over_token_and_ca_hash_fake_kubeadm_kubelet(lab, kubernetes_lab):
    fingerprint = kubernetes_lab
    first, first_s, first_output = apply(lab, f"{WORK}/kubeadm.yaml")
    assert_every_node_done(first, lab)
    # The one failure the lab makes: modprobe cannot load br_netfilter (built into this kernel).
    expected = {node: [("kmod.loaded", "br_netfilter")] for node in lab.nodes}
    assert failures(first) == expected, failed_output(first)
    assert lab.exec(MASTER, "test", "-d", "/proc/sys/net/bridge").returncode == 0
    for node, item in first["nodes"].items():
        state = next(s for s in item["states"] if s["id"] == "kubernetes-module-br_netfilter")
        assert "modprobe" in state["comment"], state
        assert item["not_run"] == 0, f"{node}: something depends on the module state"
    # cmdline.txt changed: a reboot is flagged on every node.
    assert reboot_flagged(first) == {node: True for node in lab.nodes}
    for node in lab.nodes:
        assert sh(lab, node, "cat /boot/firmware/cmdline.txt") == CMDLINE.replace(
            "rootwait\n", "rootwait cgroup_enable=cpuset cgroup_enable=memory\n")

    # kubeadm init exactly once, on the control plane, with flannel's pod network and its address.
    ran = kubeadm_calls(lab)
    inits = [argv for argv in ran[MASTER] if argv[:1] == ["init"]]
    assert len(inits) == 1, ran[MASTER]
    assert option(inits[0], "--pod-network-cidr") == "10.244.0.0/16"
    assert option(inits[0], "--apiserver-advertise-address") == lab.ip(MASTER)
    assert option(inits[0], "--kubernetes-version") == "v1.32.0"
    creates = [argv for argv in ran[MASTER] if argv[:2] == ["token", "create"]]
    assert len(creates) == 1 and "--print-join-command" in creates[0] and option(creates[0], "--ttl") == "1h", creates

    # Each worker joined once, with the control plane's endpoint, a token the control plane made
    # (and knows), and the hash of its real CA certificate, computed here as the kubeadm docs do.
    ca_hash = "sha256:" + sh(lab, MASTER, "openssl x509 -pubkey -in /etc/kubernetes/pki/ca.crt | "
                                          "openssl rsa -pubin -outform der 2>/dev/null | "
                                          "openssl dgst -sha256 -hex | sed 's/^.* //'").strip()
    tokens = {line.split()[0]: line for line in sh(lab, MASTER, "kubeadm token list").splitlines()[1:]}
    joins = {}
    for node in WORKERS:
        assert [argv[:1] for argv in ran[node]] == [["join"]], f"{node}: {ran[node]}"
        argv = ran[node][0]
        joins[node] = argv
        assert argv[1] == f"{lab.ip(MASTER)}:6443", argv
        assert option(argv, "--discovery-token-ca-cert-hash") == ca_hash, argv
        assert "--discovery-token-unsafe-skip-ca-verification" not in " ".join(argv)
        assert "pimaster" in tokens[option(argv, "--token")], "the token is not the one pimaster had made"
        assert sh(lab, node, "cat /etc/kubernetes/pki/ca.crt") == sh(lab, MASTER, "cat /etc/kubernetes/pki/ca.crt")
    token = option(joins["node02"], "--token")
    assert all(option(argv, "--token") == token for argv in joins.values()), "one token for all workers"

    # The cluster as the admin user sees it, with the kubeconfig the state gave them.
    assert sh(lab, MASTER, f"stat -c '%a %U' ~{ADMIN}/.kube/config").strip() == f"600 {ADMIN}"
    assert sh(lab, MASTER, f"cmp /etc/kubernetes/admin.conf ~{ADMIN}/.kube/config") == ""
    nodes = sh(lab, MASTER, f"runuser -u {ADMIN} -- kubectl get nodes -o name").split()
    assert sorted(nodes) == [f"node/{n}" for n in lab.nodes], nodes
    assert [argv for argv in calls(lab, MASTER, "kubectl") if "apply" in argv] == [["--kubeconfig",
            "/etc/kubernetes/admin.conf", "apply", "-f", FLANNEL]]

    # The prerequisites, on every node.
    for node in lab.nodes:
        # containerd runs with the systemd cgroup driver and its CRI plugin (what kubelet talks to).
        assert sh(lab, node, "systemctl is-active containerd").strip() == "active"
        dump = sh(lab, node, "containerd config dump")
        assert "SystemdCgroup = true" in dump and "disabled_plugins = []" in dump, dump
        assert any(line.split()[:2] == ["io.containerd.grpc.v1", "cri"] and line.split()[-1] == "ok"
                   for line in sh(lab, node, "ctr plugins ls").splitlines())
        # Kubernetes' own repository, checked against its key: apt verified the stand-in's signature.
        source = sh(lab, node, "cat /etc/apt/sources.list.d/kubernetes.list")
        assert f"deb [signed-by=/etc/apt/keyrings/kubernetes-v1.32-apt-keyring.gpg] file://{NODE_REPO}/ /" in source
        assert "trusted" not in source
        keyring = sh(lab, node, "gpg --batch --with-colons --show-keys "
                                "/etc/apt/keyrings/kubernetes-v1.32-apt-keyring.gpg")
        assert f"fpr:::::::::{fingerprint}:" in keyring
        assert sh(lab, node, "grep -qa -- '-----BEGIN' /etc/apt/keyrings/kubernetes-v1.32-apt-keyring.gpg "
                             "&& echo armored || echo binary").strip() == "binary", "the keyring is not dearmored"
        policy = sh(lab, node, "apt-cache policy kubeadm")
        assert f"*** {K8S_VERSION} 500" in policy and f"file:{NODE_REPO}" in policy, policy
        assert sh(lab, node, "apt-mark showhold").split() == ["kubeadm", "kubectl", "kubelet"]
        assert sh(lab, node, "systemctl is-enabled kubelet").strip() == "enabled"
        # Kernel settings, now and at boot.
        assert sh(lab, node, "cat /proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert sh(lab, node, "cat /etc/sysctl.d/k8s.conf").splitlines()[1:] == [
            "net.ipv4.ip_forward = 1", "net.bridge.bridge-nf-call-iptables = 1",
            "net.bridge.bridge-nf-call-ip6tables = 1"]
        assert "overlay" in sh(lab, node, "cat /etc/modules-load.d/pimaster.conf").split()

    # Tokens are never shown: not in the apply's output, not in the job's history. (The token of
    # `kubeadm init`'s own report neither.)
    history = lab.pimaster("job", first["job"], "--json", check=False).stdout   # exit 1: br_netfilter failed
    assert json.loads(history)["job"] == first["job"]
    for secret in tokens:
        assert secret not in first_output and secret not in history, "a join token is shown"
        for node in lab.nodes:
            assert sh(lab, node, f"grep -rlF {secret} /var/lib/piagent || true").strip() == ""
        for db in lab.master_state_dir.glob("pimaster.db*"):
            assert secret.encode() not in db.read_bytes(), f"a join token is in {db}"
    join_state = next(s for s in first["nodes"]["node02"]["states"] if s["id"] == "kubeadm-join")
    assert join_state["status"] == "changed" and join_state["changes"] == {"redacted": "sensitive state"}

    # Applied again: nothing changes -- no init, no token, no join, no reboot.
    before = kubeadm_calls(lab)
    second, second_s, second_output = apply(lab, f"{WORK}/kubeadm.yaml")
    assert failures(second) == expected, failed_output(second)
    assert changed(second) == {node: [] for node in lab.nodes}, changed(second)
    assert kubeadm_calls(lab) == before
    assert reboot_flagged(second) == {node: False for node in lab.nodes}
    def said(node: str, state_id: str) -> tuple[str, str]:
        found = next(s for s in second["nodes"][node]["states"] if s["id"] == state_id)
        return found["status"], found["comment"]

    assert said(MASTER, "kubeadm-init") == ("ok", "skipped: /etc/kubernetes/admin.conf exists")
    assert said(MASTER, "kubeadm-join-command") == ("skipped", "skipped: unless condition is true")
    for node in WORKERS:
        assert said(node, "kubeadm-join") == ("ok", "skipped: /etc/kubernetes/kubelet.conf exists")

    counts = {node: len(item["states"]) for node, item in first["nodes"].items()}
    figures("kubeadm.yaml", first_s, second_s)
    print(f"states per node: {counts}; join: kubeadm join {lab.ip(MASTER)}:6443 --token [6+16 characters] "
          f"--discovery-token-ca-cert-hash {ca_hash}")
