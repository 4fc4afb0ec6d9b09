"""Text data shipped in Debian packages, fetched without root: `apt-get download` the .debs into the cache, unpack
them with `dpkg -x` into a private root (nothing is installed on the system), and read the files from there.
The Debian archive's package descriptions come from the local `apt-cache dumpavail` once and are kept as a
snapshot (the archive changes; the snapshot keeps the task fixed). Licences: some fortunes are GPL and the data
is read at run time only, never redistributed.
"""

import json
import os
import shutil
import subprocess
import tempfile

PACKAGES = ["fortunes", "fortunes-min", "fortunes-de", "fortunes-it", "fortunes-es", "fortunes-pl", "fortunes-ru",
            "fortunes-cs", "fortunes-br", "fortunes-eo", "fortunes-bg", "wordnet-base"]


def _cache():
    from .experts import cache_dir

    return os.path.join(cache_dir(), "debian")


def root():
    """The unpacked root (usr/share/...), fetched on first use."""
    final = os.path.join(_cache(), "root")
    if os.path.isfile(os.path.join(final, ".complete")):
        return final
    os.makedirs(_cache(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache(), prefix=".fetch-")
    try:
        debs = os.path.join(tmp, "debs")
        os.makedirs(debs)
        try:
            subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            why = getattr(e, "stderr", "") or str(e)
            raise RuntimeError(f"cannot fetch the Debian data packages {PACKAGES} with apt-get download: "
                               f"{why}") from None
        unpack = os.path.join(tmp, "root")
        for f in sorted(os.listdir(debs)):
            subprocess.run(["dpkg", "-x", os.path.join(debs, f), unpack], check=True)
        open(os.path.join(unpack, ".complete"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(unpack, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def package_descriptions():
    """[(short description, section)] of the Debian archive, from a snapshot of `apt-cache dumpavail`."""
    path = os.path.join(_cache(), "dumpavail-snapshot.json")
    if os.path.isfile(path):
        with open(path) as f:
            return [tuple(x) for x in json.load(f)]
    try:
        text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"apt-cache dumpavail failed: {e}") from None
    pairs, fields = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if fields.get("Section") and fields.get("Description"):
                pairs.append((fields["Description"], fields["Section"].split("/")[-1]))
            fields = {}
        elif not line[0].isspace() and ":" in line:
            k, v = line.split(":", 1)
            fields[k] = v.strip()
    if not pairs:
        raise RuntimeError("apt-cache dumpavail listed no packages (run apt-get update?)")
    os.makedirs(_cache(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=_cache(), suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(pairs, f)
    os.replace(tmp, path)
    return pairs
