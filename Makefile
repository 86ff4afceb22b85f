# Every target sets up what it needs first (idempotent): see scripts/setup.sh.
.PHONY: setup demo generate test bench soak ui clean-demo

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/dagster job execute -j train_diffgap

generate: setup
	.venv/bin/dagster job execute -j generate_audio

test:
	./scripts/setup.sh --test
	.venv/bin/python -m pytest

bench:
	./scripts/setup.sh --bench
	.venv/bin/python bench/bench_features.py

soak:
	./scripts/setup.sh --test
	.venv/bin/python bench/soak_store.py

ui: setup
	.venv/bin/dagster dev

clean-demo:
	rm -rf .data .dagster_home/storage .dagster_home/history .dagster_home/schedules
