# A/B of engine switches at 448x448 (FRAMES frames, default 256, no whole-video run): each argument a
# python statement run on streamchat.hf.attention (as h) before the bench. Prints the chunk table, encode rate and GPU-busy share.
B="'bench','--frames','${FRAMES:-256}','--width','448','--height','448','--no-offline','--max-new-tokens','8','--no-repeat-questions'"
for v in "${@:-pass}"; do echo "== $v"; python3 -c "import streamchat.hf.attention as h; $v; from streamchat.cli import main; main([$B])" 2>&1 | grep -E "frames/s;|GPU busy|^ +[0-9]+ +[0-9]+ +[0-9]+ "; done
