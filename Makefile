# Convenience targets; the scripts are what the README and CI call.
.PHONY: demo test bench release deb
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	bash benches/measure.sh
release:
	scripts/deps.sh build && cargo build --release
deb:
	scripts/deps.sh deb && cargo deb --locked
