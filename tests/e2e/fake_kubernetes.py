#!/usr/bin/python3
"""Stand-ins for kubeadm, kubelet and kubectl on the lab's nodes (test_kubeadm_fake_kubeadm_kubelet.py).

The lab cannot run Kubernetes (no internet for the images, no kernel modules in its containers), so
the test packages this one script three times, as /usr/bin/kubeadm, /usr/bin/kubelet and
/usr/bin/kubectl, in .debs of a signed apt repository of its own. Every run appends its program
name and arguments to /var/log/fake-kubernetes/calls.log (one JSON object a line), which is what the
test reads. Beyond recording, each does what kubeadm.yaml relies on, the way the real programs do it:

kubeadm init        preflight (no swap, ip_forward = 1, containerd's socket, not initialized yet);
                    a real CA certificate (openssl) in /etc/kubernetes/pki; admin.conf naming the
                    API server and carrying the CA; the API server's manifest; kubelet restarted,
                    which then serves the stand-in API on :6443; a default bootstrap token.
kubeadm token create [--print-join-command]   a bootstrap token made by the API server (with a
                    TTL); the join command with the sha256 of the CA's public key (SubjectPublicKeyInfo).
kubeadm join        refuses --discovery-token-unsafe-skip-ca-verification and a missing hash;
                    preflight; fetches the CA from the API server (cluster-info), checks its hash
                    against --discovery-token-ca-cert-hash, and registers the node with the token,
                    which the API server checks (known, not expired); writes kubelet.conf.
kubelet             serves the stand-in API when the control plane's manifest is there, idles on a
                    joined worker, exits 1 (systemd restarts it) while unconfigured -- as the real one.
kubectl get nodes [-o name] / apply -f URL    through the API server named in the kubeconfig
                    (--kubeconfig, $KUBECONFIG or ~/.kube/config, which must be readable).

The API is plain HTTP with JSON (the real one is TLS with protobuf): a stand-in, inside the lab.
"""

import base64
import datetime
import hashlib
import http.server
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

VERSION = "v1.32.0"
CALLS = "/var/log/fake-kubernetes/calls.log"
STORE = "/var/lib/fake-kubernetes/apiserver.json"
PKI = "/etc/kubernetes/pki"
ADMIN_CONF = "/etc/kubernetes/admin.conf"
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"
MANIFEST = "/etc/kubernetes/manifests/kube-apiserver.yaml"
KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
PORT = 6443
BOOLEAN_FLAGS = {"--print-join-command", "--discovery-token-unsafe-skip-ca-verification", "--dry-run", "--help"}


def record(program: str, argv: list[str]) -> None:
    os.makedirs(os.path.dirname(CALLS), exist_ok=True)
    if os.getuid() == 0:
        os.chmod(os.path.dirname(CALLS), 0o1777)
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    if os.getuid() == 0:
        os.fchmod(fd, 0o666)  # the admin user's kubectl records its calls too
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps({"program": program, "argv": argv, "uid": os.getuid(), "time": time.time()}) + "\n")


def fail(message: str, code: int = 1):
    print(message, file=sys.stderr)
    sys.exit(code)


def parse(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    positional, options, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg != "-":
            if "=" in arg:
                key, value = arg.split("=", 1)
                options[key] = value
            elif arg in BOOLEAN_FLAGS:
                options[arg] = True
            elif i + 1 < len(argv):
                options[arg] = argv[i + 1]
                i += 1
            else:
                fail(f"flag needs an argument: {arg}")
        else:
            positional.append(arg)
        i += 1
    return positional, options


def duration_s(text: str) -> int:
    if not re.fullmatch(r"(\d+[hms])+", text):
        fail(f'invalid argument "{text}" for "--ttl" flag: time: invalid duration "{text}"')
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", text))


def short_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return "<invalid>"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def ca_hash(ca_pem: bytes) -> str:
    """sha256 of the CA certificate's public key (DER SubjectPublicKeyInfo), as kubeadm pins it."""
    pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=ca_pem, capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    return "sha256:" + hashlib.sha256(der).hexdigest()


def preflight(joining: bool) -> None:
    errors = []
    with open("/proc/swaps") as fh:
        if len(fh.read().strip().splitlines()) > 1:
            errors.append("[ERROR Swap]: running with swap on is not supported. Please disable swap")
    with open("/proc/sys/net/ipv4/ip_forward") as fh:
        if fh.read().strip() != "1":
            errors.append("[ERROR FileContent--proc-sys-net-ipv4-ip_forward]: /proc/sys/net/ipv4/ip_forward "
                          "contents are not set to 1")
    if not os.path.exists("/run/containerd/containerd.sock"):
        errors.append("[ERROR CRI]: container runtime is not running: /run/containerd/containerd.sock is missing")
    taken = KUBELET_CONF if joining else MANIFEST
    if os.path.exists(taken):
        errors.append(f"[ERROR FileAvailable--{taken.strip('/').replace('/', '-')}]: {taken} already exists")
    if errors:
        fail("[preflight] Some fatal errors occurred:\n\t" + "\n\t".join(errors) +
             "\nerror execution phase preflight: (stand-in kubeadm)")


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)


def kubeconfig(server: str, ca_pem: bytes, user: str) -> str:
    ca = base64.b64encode(ca_pem).decode()
    return (f"apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n"
            f"    server: {server}\n  name: kubernetes\ncontexts:\n- context:\n    cluster: kubernetes\n"
            f"    user: {user}\n  name: {user}@kubernetes\ncurrent-context: {user}@kubernetes\n"
            f"users:\n- name: {user}\n  user:\n    token: stand-in-credentials-of-{user}\n")


def server_of(config_path: str) -> tuple[str, bytes]:
    try:
        with open(config_path) as fh:
            text = fh.read()
    except OSError as exc:
        fail(f"error loading config file \"{config_path}\": {exc.strerror}")
    server = re.search(r"^\s*server:\s*(\S+)", text, re.M)
    ca = re.search(r"certificate-authority-data:\s*(\S+)", text)
    if not server or not ca:
        fail(f"{config_path} names no server")
    return server.group(1), base64.b64decode(ca.group(1))


def api(server: str, method: str, path: str, body: dict | None = None):
    url = server.replace("https://", "http://", 1).rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        fail(f"error from the API server {server}: {exc.read().decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"The connection to the server {server} was refused - did you specify the right host or port? ({exc})")


def new_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    pick = lambda n: "".join(secrets.choice(alphabet) for _ in range(n))  # noqa: E731
    return f"{pick(6)}.{pick(16)}"


# -----------------------------------------------------------------------------------------------
# kubeadm

def kubeadm(argv: list[str]) -> None:
    positional, options = parse(argv)
    command = positional[:2]
    if positional[:1] == ["version"]:
        print(VERSION if options.get("-o") == "short" or options.get("--output") == "short"
              else f'kubeadm version: &version.Info{{GitVersion:"{VERSION}"}}')
    elif positional[:1] == ["init"]:
        init(options)
    elif positional[:1] == ["join"]:
        join(positional[1:], options)
    elif command == ["token", "create"]:
        server, ca_pem = server_of(str(options.get("--kubeconfig", ADMIN_CONF)))
        made = api(server, "POST", "/tokens", {"ttl": duration_s(str(options.get("--ttl", "24h0m0s"))),
                                               "description": options.get("--description", "")})
        if options.get("--print-join-command"):
            endpoint = server.split("://", 1)[1]
            print(f"kubeadm join {endpoint} --token {made['token']} --discovery-token-ca-cert-hash "
                  f"{ca_hash(ca_pem)} ")
        else:
            print(made["token"])
    elif command == ["token", "list"]:
        server, _ = server_of(str(options.get("--kubeconfig", ADMIN_CONF)))
        print(f"{'TOKEN':<26}{'TTL':<12}{'EXPIRES':<23}{'USAGES':<25}{'DESCRIPTION':<60}EXTRA GROUPS")
        for token in api(server, "GET", "/tokens"):
            expires = datetime.datetime.fromtimestamp(token["expires"], datetime.timezone.utc)
            print(f"{token['token']:<26}{short_duration(token['expires'] - time.time()):<12}"
                  f"{expires.strftime('%Y-%m-%dT%H:%M:%SZ'):<23}{'authentication,signing':<25}"
                  f"{token['description'] or '<none>':<60}system:bootstrappers:kubeadm:default-node-token")
    else:
        fail(f"stand-in kubeadm: unknown command {' '.join(positional)!r}")


def init(options: dict) -> None:
    preflight(joining=False)
    address = str(options.get("--apiserver-advertise-address") or socket.gethostbyname(socket.gethostname()))
    pod_cidr = str(options.get("--pod-network-cidr", ""))
    print(f"[init] Using Kubernetes version: {options.get('--kubernetes-version', VERSION)}")
    os.makedirs(PKI, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{PKI}/ca.key",
                    "-out", f"{PKI}/ca.crt", "-days", "3650", "-subj", "/CN=kubernetes"],
                   check=True, capture_output=True)
    os.chmod(f"{PKI}/ca.key", 0o600)
    with open(f"{PKI}/ca.crt", "rb") as fh:
        ca_pem = fh.read()
    write(MANIFEST, f"# stand-in kube-apiserver\nadvertise-address: {address}\nservice-cluster-ip-range: 10.96.0.0/12\n"
                    f"cluster-cidr: {pod_cidr}\n", 0o600)
    write(KUBELET_CONFIG, "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
                          "cgroupDriver: systemd\n")
    token = new_token()
    os.makedirs(os.path.dirname(STORE), exist_ok=True)
    store = {"tokens": [{"token": token, "expires": time.time() + 86400,
                         "description": "The default bootstrap token generated by 'kubeadm init'."}],
             "nodes": [socket.gethostname().lower()], "applied": []}
    write(STORE, json.dumps(store), 0o600)
    server = f"https://{address}:{PORT}"
    write(ADMIN_CONF, kubeconfig(server, ca_pem, "kubernetes-admin"), 0o600)
    write(KUBELET_CONF, kubeconfig(server, ca_pem, f"system:node:{socket.gethostname().lower()}"), 0o600)
    subprocess.run(["systemctl", "restart", "kubelet"], check=True)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2) as response:
                if response.read() == b"ok":
                    break
        except OSError:
            pass
        if time.time() > deadline:
            fail("[wait-control-plane] the API server did not come up within 60 s")
        time.sleep(0.2)
    print("\nYour Kubernetes control-plane has initialized successfully!\n\n"
          "Then you can join any number of worker nodes by running the following on each as root:\n\n"
          f"kubeadm join {address}:{PORT} --token {token} \\\n\t--discovery-token-ca-cert-hash {ca_hash(ca_pem)} ")


def join(positional: list[str], options: dict) -> None:
    if options.get("--discovery-token-unsafe-skip-ca-verification"):
        fail("stand-in kubeadm: refusing --discovery-token-unsafe-skip-ca-verification (pimaster must never skip it)")
    wanted = options.get("--discovery-token-ca-cert-hash")
    token = options.get("--token")
    if not positional or not token or not wanted:
        fail("discovery: Invalid value: \"\": using token-based discovery without caCertHashes can be unsafe. "
             "Set unsafeSkipCAVerification as true in your kubeadm config file or pass "
             "--discovery-token-unsafe-skip-ca-verification flag to continue")
    preflight(joining=True)
    server = f"https://{positional[0]}"
    info = api(server, "GET", "/cluster-info")
    ca_pem = info["ca"].encode()
    found = ca_hash(ca_pem)
    if found != wanted:
        fail(f'error execution phase preflight: couldn\'t validate the identity of the API Server: cluster CA found '
             f'in cluster-info ConfigMap is invalid: none of the public keys "{found}" are pinned')
    name = socket.gethostname().lower()
    api(server, "POST", "/nodes", {"name": name, "token": token})
    os.makedirs(PKI, exist_ok=True)
    write(f"{PKI}/ca.crt", ca_pem.decode())
    write(KUBELET_CONFIG, "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
                          "cgroupDriver: systemd\n")
    write(KUBELET_CONF, kubeconfig(server, ca_pem, f"system:node:{name}"), 0o600)
    subprocess.run(["systemctl", "restart", "kubelet"], check=True)
    print("This node has joined the cluster:\n* Certificate signing request was sent to apiserver and a response "
          "was received.\n\nRun 'kubectl get nodes' on the control-plane to see this node join the cluster.")


# -----------------------------------------------------------------------------------------------
# kubelet: the API server's stand-in when the control plane's manifest is there

class Api(http.server.BaseHTTPRequestHandler):
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, value) -> None:
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def load(self) -> dict:
        with open(STORE) as fh:
            return json.load(fh)

    def save(self, store: dict) -> None:
        write(STORE + ".new", json.dumps(store), 0o600)
        os.replace(STORE + ".new", STORE)

    def do_GET(self) -> None:
        with self.lock:
            store = self.load()
        if self.path == "/healthz":
            self.reply(200, b"ok")
        elif self.path == "/cluster-info":
            with open(f"{PKI}/ca.crt") as fh:
                self.reply(200, {"ca": fh.read()})
        elif self.path == "/nodes":
            self.reply(200, store["nodes"])
        elif self.path == "/tokens":
            self.reply(200, [t for t in store["tokens"] if t["expires"] > time.time()])
        else:
            self.reply(404, {"error": f"no {self.path}"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with self.lock:
            store = self.load()
            if self.path == "/tokens":
                made = {"token": new_token(), "expires": time.time() + int(body.get("ttl") or 86400),
                        "description": body.get("description") or ""}
                store["tokens"].append(made)
                self.save(store)
                self.reply(201, made)
            elif self.path == "/nodes":
                valid = [t for t in store["tokens"] if t["token"] == body.get("token") and t["expires"] > time.time()]
                if not valid:
                    self.reply(403, {"error": f"token id \"{str(body.get('token')).split('.')[0]}\" is invalid for "
                                              "this cluster or it has expired"})
                    return
                if body["name"] not in store["nodes"]:
                    store["nodes"].append(body["name"])
                self.save(store)
                self.reply(201, {"name": body["name"]})
            elif self.path == "/manifests":
                store["applied"].append(body.get("source"))
                self.save(store)
                self.reply(201, {"applied": body.get("source")})
            else:
                self.reply(404, {"error": f"no {self.path}"})


def kubelet(argv: list[str]) -> None:
    if os.path.exists(MANIFEST):
        server = http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Api)
        server.serve_forever()
    elif os.path.exists(KUBELET_CONF):
        while True:
            time.sleep(3600)
    else:
        fail(f'"command failed" err="failed to load kubelet config file, path: {KUBELET_CONFIG}" (stand-in kubelet)')


# -----------------------------------------------------------------------------------------------
# kubectl

def kubectl(argv: list[str]) -> None:
    positional, options = parse(argv)
    config = options.get("--kubeconfig") or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not os.path.exists(str(config)):
        fail("The connection to the server localhost:8080 was refused - did you specify the right host or port?")
    server, _ = server_of(str(config))
    if positional[:2] == ["get", "nodes"]:
        nodes = api(server, "GET", "/nodes")
        if options.get("-o") == "name" or options.get("--output") == "name":
            print("\n".join(f"node/{n}" for n in nodes))
        else:
            print(f"{'NAME':<12}{'STATUS':<8}VERSION")
            for n in nodes:
                print(f"{n:<12}{'Ready':<8}{VERSION}")
    elif positional[:1] == ["apply"] and options.get("-f"):
        api(server, "POST", "/manifests", {"source": options["-f"]})
        print(f"(stand-in) applied {options['-f']}")
    else:
        fail(f"stand-in kubectl: unknown command {' '.join(positional)!r}")


def main() -> None:
    program = os.path.basename(sys.argv[0])
    record(program, sys.argv[1:])
    {"kubeadm": kubeadm, "kubelet": kubelet, "kubectl": kubectl}[program](sys.argv[1:])


if __name__ == "__main__":
    main()
