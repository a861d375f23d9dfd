"""Regenerates the tables of docs/low_density_study.md (see sparse_grad.demo.study):

    python benchmarks/low_density_study.py --out low_density_study --repeats 2
"""
import sys

from sparse_grad.demo.study import main

if __name__ == "__main__":
    sys.exit(main())
