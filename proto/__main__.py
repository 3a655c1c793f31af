"""``python -m proto``: (re)generate the gRPC stubs (for a build hook)."""
import sys

from proto import ensure_stubs

if __name__ == "__main__":
    print(ensure_stubs(force="--force" in sys.argv))
