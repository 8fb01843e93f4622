# Corpus of tests/nar_ca_real_nix.rs. Every builder also copies its outputs, exactly as Nix is
# about to hash them (at their scratch paths, before any rewriting), to `cap`, and records the
# path it was given as $out. `./bb` holds `busybox` and `sh -> busybox`.
{ tag, cap }:
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  base = { system = builtins.currentSystem; builder = "${bb}/sh"; };
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  capture = name: outs: builtins.concatStringsSep "\n" (map (o:
    "mkdir -p ${cap}/${name}; cp -a \$${o} ${cap}/${name}/${o}; echo -n \$${o} > ${cap}/${name}/${o}.path") outs);
  mk = attrs: name: outs: script: derivation (base // attrs // {
    inherit name;
    outputs = outs;
    args = [ "-c" (script + "\n" + capture name outs) ];
  });
in rec {
  # Input-addressed tree with every kind of node and awkward names.
  tree = mk { } "tree" [ "out" ] ''
    mkdir -p $out/sub/deeper $out/emptydir
    echo data-${tag} > $out/sub/deeper/file
    printf "" > $out/empty
    printf '#!/bin/sh\necho hi\n' > $out/run.sh; chmod 755 $out/run.sh
    ln -s sub/deeper/file $out/rel-link
    ln -s ${bb}/busybox $out/abs-link
    printf 12345678 > $out/eight
    echo A > $out/Upper; echo b > $out/a-b; echo c > $out/a.b; echo d > $out/a_b
    printf x > "$out/$(printf 'n\303\274')"
    head -c 100001 ${bb}/busybox > $out/sub/blob
  '';
  # Floating CA with self-references, an executable and a symlink to itself.
  dep = mk ca "ca-dep" [ "out" ] ''
    mkdir $out; echo dep-${tag} > $out/data; echo $out > $out/self
    ln -s $out/data $out/self-link; printf '#!x' > $out/bin; chmod 755 $out/bin
  '';
  # Three outputs: out -> lib -> dev, dev refers to itself and to dep.
  multi = mk ca "ca-multi" [ "out" "lib" "dev" ] ''
    mkdir $out $lib $dev
    echo $lib > $out/lib-ref; echo ${tag} > $out/t
    echo "$dev $dev" > $lib/dev-ref
    echo $dev > $dev/self; echo ${dep} > $dev/dep
  '';
  # Cross references to two CA inputs, several self-references.
  top = mk ca "ca-top" [ "out" ] ''
    mkdir -p $out/d; echo ${dep} > $out/ref; echo ${multi.dev}/self > $out/d/multi
    echo "$out $out/x ${dep}" > $out/self; ln -s $out/ref $out/d/link
  '';
  # Floating CA, flat file.
  flat = mk { __contentAddressed = true; outputHashMode = "flat"; outputHashAlgo = "sha256"; } "ca-flat" [ "out" ] ''
    printf flat-${tag} > $out
  '';
  # Floating CA, recursive SHA-512 (an output:out path, no references allowed).
  sha512 = mk { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha512"; } "ca-sha512" [ "out" ] ''
    mkdir $out; echo ${tag} > $out/t
  '';
  note = builtins.toFile "note-${tag}" "a text file ${tag}\n";
  # Input-addressed, refers to a text file and a CA output.
  user = mk { } "user" [ "out" ] ''
    mkdir $out; cat ${note} > $out/n; echo ${note} ${top} > $out/refs
  '';
}
