#!/usr/bin/env bash
# End-to-end test of the desktop app in a real window (tauri-driver + WebKitWebDriver under Xvfb).
# Builds the UI and the app, then drives it: import a LoRA, generate with miniworld, see the image
# in the gallery, export it. Leaves target/e2e/screenshot.png (and one screenshot per pane).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

for tool in Xvfb WebKitWebDriver import; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is missing (apt-get install xvfb webkit2gtk-driver imagemagick)"; exit 1; }
done
if ! command -v tauri-driver >/dev/null; then
  cargo install tauri-driver --locked --version '^2'
fi
(cd ui && npm install --no-audit --no-fund --loglevel=error && npm run build --silent)
# The test profile shares every artifact with `cargo test --workspace` (the README's test command).
cargo build -p loramix-app --profile test --locked
(cd tests/e2e && npm install --no-audit --no-fund --loglevel=error)

home=$(mktemp -d)
cleanup() {
  kill "${driver_pid:-}" "${xvfb_pid:-}" 2>/dev/null || true
  rm -rf "$home"
}
trap cleanup EXIT
display=:$((90 + RANDOM % 100))
Xvfb "$display" -screen 0 1280x820x24 -nolisten tcp &
xvfb_pid=$!
sleep 1
export DISPLAY=$display LORAMIX_HOME=$home/library LORAMIX_MODELS=$repo/models
# WebKit in a container: no sandbox, software rendering.
export WEBKIT_DISABLE_COMPOSITING_MODE=1 WEBKIT_DISABLE_DMABUF_RENDERER=1 LIBGL_ALWAYS_SOFTWARE=1
tauri-driver --port 4444 &
driver_pid=$!
sleep 2
REPO=$repo APP=$repo/target/debug/loramix-app LORAMIX_HOME=$home timeout 600 node tests/e2e/e2e.mjs
echo "e2e: screenshot at target/e2e/screenshot.png"
