from kvmksm.cli import run

# Guarded: multiprocessing's spawn re-imports the main module in its children.
if __name__ == "__main__":
    run()
