"""``python -m protos``: (re)generate the gRPC code from the .proto."""

from protos import build

if __name__ == "__main__":
    print(f"generated into {build(force=True)}")
