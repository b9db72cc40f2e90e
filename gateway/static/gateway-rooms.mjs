// ES module entry of the rooms script: importing it gives every Gateway its room() method.
import "./gateway.mjs";
import "./gateway-rooms.js";

export const { Room } = globalThis.PgGateway;
