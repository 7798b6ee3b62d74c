# The two commands of the README. Both run tools/setup.sh first (quick when already done).
.PHONY: setup demo test

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/fastcd demo --force

test: setup
	.venv/bin/python -m pytest
