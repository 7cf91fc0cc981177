# tests/gpu/sysroot.sh - sourced by the device-machine scripts. The device
# machine has no network: Debian packages the build needs travel as .deb
# files in $APEX_DEB_DIR (default .debs) and are unpacked into a folder of
# the build, never into /.
#   use_debs SYSROOT   unpacks every .deb there and points pkg-config, the
#                      compiler and the loader at it; sets PKGCONF_EXE to an
#                      unpacked pkgconf when the machine has no pkg-config.
#                      Returns 1 when there are no .deb files.
use_debs() {
    local sr=$1 debs=${APEX_DEB_DIR:-$ROOT/.debs} f
    compgen -G "$debs/*.deb" >/dev/null || return 1
    rm -rf "$sr" && mkdir -p "$sr"
    for f in "$debs"/*.deb; do dpkg -x "$f" "$sr" && echo "unpacked $(basename "$f")"; done
    # .pc files name /usr: point them at the unpacked tree
    find "$sr" -name '*.pc' -exec sed -i "s#/usr#$sr/usr#g" {} +
    local lib=$sr/usr/lib/x86_64-linux-gnu
    export PKG_CONFIG_PATH=$lib/pkgconfig:$sr/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LIBRARY_PATH=$lib${LIBRARY_PATH:+:$LIBRARY_PATH}
    export CPATH=$sr/usr/include${CPATH:+:$CPATH}
    PKGCONF_EXE=
    if ! command -v pkg-config >/dev/null 2>&1 && [ -x "$sr/usr/bin/pkgconf" ]; then
        ln -sf pkgconf "$sr/usr/bin/pkg-config"
        export PATH=$sr/usr/bin:$PATH
        PKGCONF_EXE=$sr/usr/bin/pkgconf
    fi
    return 0
}
