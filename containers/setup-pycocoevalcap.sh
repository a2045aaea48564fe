#!/usr/bin/env bash
# Make the installed pycocoevalcap 1.2 complete and usable from a read-only image (run at image build time
# by containers/Dockerfile and containers/cwdpo.def, after `pip install pycocoevalcap==1.2`):
#   1. SPICE's Stanford CoreNLP 3.6.0 jars (stanford-corenlp-3.6.0.jar, stanford-corenlp-3.6.0-models.jar)
#      into pycocoevalcap/spice/lib: from Maven Central (edu.stanford.nlp:stanford-corenlp:3.6.0 and its
#      `models` classifier), each checked against Maven's SHA-1; or copied from $CORENLP_DIR when set
#      (a site mirror / offline build). Without them pycocoevalcap downloads a zip at first use.
#   2. spice/tmp and spice/cache (where spice.py writes its input/output and parse cache) become symlinks
#      to /tmp/pycocoevalcap-spice/{tmp,cache}; a .pth file in site-packages creates those folders at
#      every interpreter start.
#   3. the PTB tokenizer writes its input file into the system temp dir instead of its package folder.
# Usage: setup-pycocoevalcap.sh [PKG_DIR [SITE_DIR]]   (default: found with the current `python`)
set -euo pipefail
PKG=${1:-$(python -c "import importlib.util as u; print(list(u.find_spec('pycocoevalcap').submodule_search_locations)[0])")}
SITE=${2:-$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
MAVEN=${MAVEN:-https://repo1.maven.org/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0}
TMPROOT=/tmp/pycocoevalcap-spice
[ -f "$PKG/spice/spice.py" ] && [ -f "$PKG/tokenizer/ptbtokenizer.py" ] || { echo "not pycocoevalcap: $PKG" >&2; exit 1; }

# 1. CoreNLP jars
for jar in stanford-corenlp-3.6.0.jar stanford-corenlp-3.6.0-models.jar; do
  if [ -n "${CORENLP_DIR:-}" ]; then
    cp "$CORENLP_DIR/$jar" "$PKG/spice/lib/$jar"
  else
    curl -fsSL --retry 3 -o "$PKG/spice/lib/$jar" "$MAVEN/$jar"
    echo "$(curl -fsSL --retry 3 "$MAVEN/$jar.sha1" | cut -c1-40)  $PKG/spice/lib/$jar" | sha1sum -c -
  fi
done

# 2. SPICE's temp and cache folders live under /tmp
rm -rf "$PKG/spice/tmp" "$PKG/spice/cache"
ln -s "$TMPROOT/tmp" "$PKG/spice/tmp"
ln -s "$TMPROOT/cache" "$PKG/spice/cache"
echo "import os; [os.makedirs(os.path.join('$TMPROOT', d), exist_ok=True) for d in ('tmp', 'cache')]" \
  >"$SITE/pycocoevalcap_tmpdirs.pth"

# 3. PTBTokenizer: input file in the system temp dir, passed by absolute path
TOK="$PKG/tokenizer/ptbtokenizer.py"
sed -i -e 's/dir=path_to_jar_dirname)/dir=tempfile.gettempdir())/' \
       -e 's/cmd.append(os.path.basename(tmp_file.name))/cmd.append(tmp_file.name)/' "$TOK"
grep -q 'dir=tempfile.gettempdir())' "$TOK" && grep -q 'cmd.append(tmp_file.name)' "$TOK" \
  || { echo "could not patch $TOK (pycocoevalcap is not 1.2?)" >&2; exit 1; }

chmod -R a+rX "$PKG"
echo "pycocoevalcap ready for read-only use: $PKG"
