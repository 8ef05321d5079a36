B="'bench','--frames','256','--width','448','--height','448','--no-offline','--max-new-tokens','8','--no-repeat-questions'"
for v in "pass" "h.SPLIT_MIN_QUERIES=1024" "h.speed_up=h.pad_vision_mlp"; do echo "== $v"; python3 -c "import streamchat.hf as h; $v; from streamchat.cli import main; main([$B])" 2>&1 | grep -E "frames/s;|GPU busy|^ +[0-9]+ +[0-9]+ +[0-9]+ "; done
