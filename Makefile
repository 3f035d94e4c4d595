# twinray: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned here (not in pyproject) because this machine serves exactly these from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dali,ffcv,dicom,s3,onnx,dev
# FFCV builds from source against these.
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
RAW ?= data/raw
PACKED ?= data/packed
DEMO ?= data/demo
STAMP := $(VENV)/.installed
# Two pytest-xdist workers, one thread each (tests/conftest.py), slow tests first; worksteal evens out the tail.
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: install test demo prep lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "install: apt packages$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  else echo "install: missing apt packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m prep sample --out $(DEMO)/raw --n 400
	$(PY) -m prep covid --src $(DEMO)/raw/COVID-19_Radiography_Dataset --out $(DEMO)/packed
	$(PY) -m prep verify $(DEMO)/packed
	$(PY) -m prep info $(DEMO)/packed
	$(PY) -m twinray.pipelines.preview --data $(DEMO)/packed --recipe seed-final --out $(DEMO)/preview-seed-final.png
	$(PY) train/pretrain.py --data $(DEMO)/packed --out $(DEMO)/pretrain --epochs 4 --size 64 --batch-size 64 \
	    --wandb offline --log-every 1
	$(VENV)/bin/twinray embed --model $(DEMO)/pretrain --data $(DEMO)/packed --out $(DEMO)/embed
	$(PY) -m prep sample --out $(DEMO)/raw --dicom-tree --patients 30
	$(PY) -m prep images --src $(DEMO)/raw/dicom-export --out $(DEMO)/hospital
	$(PY) train/pretrain.py --data $(DEMO)/hospital --eval-data $(DEMO)/packed --out $(DEMO)/pretrain-unlabeled \
	    --epochs 2 --size 64 --batch-size 16 --eval-every 1 --wandb offline
	$(PY) train/scan.py configs/demo-scan.yaml --out $(DEMO)/scan
	$(PY) train/gradcam.py --data $(DEMO)/packed --out $(DEMO)/gradcam.png \
	    --models $(DEMO)/scan/init-pretrain_fraction-1.0/seed-0 $(DEMO)/scan/init-random_fraction-1.0/seed-0
	@echo "demo outputs: $(DEMO)/packed (dataset), $(DEMO)/preview-seed-final.png (views), $(DEMO)/pretrain (run)"
	@echo "  embeddings and their map: $(DEMO)/embed/map.png; a DICOM export packed without labels: $(DEMO)/hospital,"
	@echo "  pretrained on with kNN on the labelled set: $(DEMO)/pretrain-unlabeled"
	@echo "  label-fraction scan: $(DEMO)/scan/scan.png and summary.csv; Grad-CAM grid: $(DEMO)/gradcam.png"

prep: install
	$(PY) -m prep all --raw $(RAW) --out $(PACKED)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache

# The real-data label-efficiency studies (docs/results.md): real-cxr (two hospitals), then kermany-cxr (one
# hospital, with the thumbnail floor); `make study-kermany` runs the second alone. Re-running skips finished runs.
REAL_CXR ?= ../shared/data/real-cxr
KERMANY_CXR ?= ../shared/data/kermany-cxr
STUDY_PROFILE ?= auto
.PHONY: study-real study-kermany
study-real: install
	$(PY) train/study_real.py configs/study-real.yaml --profile $(STUDY_PROFILE) --raw $(REAL_CXR)
	$(PY) train/study_real.py configs/study-kermany.yaml --profile $(STUDY_PROFILE) --raw $(KERMANY_CXR)
study-kermany: install
	$(PY) train/study_real.py configs/study-kermany.yaml --profile $(STUDY_PROFILE) --raw $(KERMANY_CXR)
