# Test corpus for nix-formats: instantiated and built by tests/common/mod.rs with a random `tag`
# so that Nix really builds every run. `./bb` holds `busybox` and `sh -> busybox`.
{ tag ? "1", flatHash ? "", recHash ? "", recSha1 ? "" }:
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  base = { system = builtins.currentSystem; builder = "${bb}/sh"; };
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  note = builtins.toFile "note-${tag}.txt" "a text input ${tag}\n";
  sh = script: [ "-c" script ];
in rec {
  # Floating CA, self-reference.
  caDep = derivation (base // ca // {
    name = "ca-dep";
    args = sh "echo building dep ${tag}; mkdir $out; echo dep-${tag} > $out/data; echo $out > $out/self";
  });
  # Floating CA, multiple outputs: out refers to dev, dev refers to itself and to caDep.
  caMulti = derivation (base // ca // {
    name = "ca-multi";
    outputs = [ "out" "dev" ];
    args = sh "mkdir $out $dev; echo $dev > $out/dev-ref; echo $dev > $dev/self; echo ${caDep} > $dev/dep; echo ${tag} > $out/t";
  });
  # Floating CA, cross-references to two CA inputs (level 2 of the chain), passAsFile, escapes.
  caTop = derivation (base // ca // {
    name = "ca-top";
    passAsFile = [ "big" ];
    big = "contents ${tag} ${caDep} ${caMulti.dev}";
    weird = "quote\" backslash\\ newline\n tab\t cr\r unicode-ü-😀 dollar$";
    ctrl = builtins.fromJSON "\"a\\u0001b\\u0008c\\u000cd\\u007fe\\u001ff\"";
    args = sh "mkdir $out; cat ${caDep}/data > $out/copied; echo ${caDep} > $out/ref; cp $bigPath $out/big; echo $out > $out/self; cat ${note} > $out/note";
  });
  # Level 3 of the chain: needs caTop resolved first.
  caChain = derivation (base // ca // {
    name = "ca-chain";
    args = sh "mkdir $out; echo ${caTop} > $out/top; echo ${caMulti} > $out/multi";
  });
  # Fixed outputs: flat sha256, recursive sha256 (a source path), recursive sha1 (output:out).
  # Their contents carry the tag so that every run builds (and signs) them anew.
  fodFlat = derivation (base // {
    name = "fod-flat";
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = flatHash;
    args = sh "printf 'hello ${tag}' > $out";
  });
  fodRec = derivation (base // {
    name = "fod-rec";
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = recHash;
    args = sh "mkdir $out; printf 'hello ${tag}' > $out/hello";
  });
  fodRecSha1 = derivation (base // {
    name = "fod-rec-sha1";
    outputHashMode = "recursive"; outputHashAlgo = "sha1"; outputHash = recSha1;
    args = sh "mkdir $out; printf 'hello ${tag}' > $out/hello";
  });
  # Input-addressed, on fixed outputs and a text input.
  iaPlain = derivation (base // {
    name = "ia-plain";
    args = sh "mkdir $out; cat ${fodFlat} > $out/h; ls ${fodRec} ${fodRecSha1} > $out/l; cat ${note} > $out/n; echo ${tag} > $out/t";
  });
  # Input-addressed, multiple outputs.
  iaMulti = derivation (base // {
    name = "ia-multi";
    outputs = [ "out" "lib" "doc" ];
    args = sh "mkdir $out $lib $doc; echo $lib > $out/lib; echo ${iaPlain} > $lib/p; echo ${tag} > $doc/t";
  });
  # Input-addressed on a floating CA input: deferred outputs, resolved before building.
  iaDeferred = derivation (base // {
    name = "ia-deferred";
    args = sh "mkdir $out; echo ${caTop} > $out/top; echo ${iaMulti.lib} > $out/lib";
  });

  # Instantiated only (never built): no args, control characters, an impure derivation.
  noArgs = derivation {
    name = "no-args"; system = builtins.currentSystem; builder = "${bb}/sh"; args = [ ];
    ctrl = builtins.fromJSON "\"\\u0002 \\t\"";
    tag = tag;
  };
  impure = derivation (base // {
    name = "impure"; __impure = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = sh "mkdir $out; echo ${tag} > $out/t";
  });
}
