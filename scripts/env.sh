#!/usr/bin/env bash
# Source this: creates .venv at the repo root on first use and installs the pinned requirements into it.
# torch is installed first and pinned, so that deepspeed never pulls a multi-GB CUDA build of torch.
_CPM2_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_CPM2_VENV="${CPM2_VENV:-${_CPM2_ROOT}/.venv}"
_CPM2_REQ="${1:-requirements.txt}"
_cpm2_stamp="${_CPM2_VENV}/.installed-$(cat "${_CPM2_ROOT}/${_CPM2_REQ}" "${_CPM2_ROOT}/requirements.txt" | sha256sum | cut -c1-16)"
if [ ! -x "${_CPM2_VENV}/bin/python" ]; then
  echo "[cpm2] creating ${_CPM2_VENV}"
  python3 -m venv "${_CPM2_VENV}"
fi
if [ ! -f "${_cpm2_stamp}" ]; then
  echo "[cpm2] installing ${_CPM2_REQ} into ${_CPM2_VENV} (first run only; a few minutes)"
  "${_CPM2_VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "$(grep -E '^torch==' "${_CPM2_ROOT}/requirements.txt")"
  "${_CPM2_VENV}/bin/python" -m pip install --quiet --disable-pip-version-check -r "${_CPM2_ROOT}/${_CPM2_REQ}"
  touch "${_cpm2_stamp}"
fi
export PATH="${_CPM2_VENV}/bin:${PATH}"
export PYTHON="${_CPM2_VENV}/bin/python"
